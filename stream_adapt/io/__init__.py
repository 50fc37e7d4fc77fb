"""The edges: where records come from and where results go. The learning core never imports these."""
