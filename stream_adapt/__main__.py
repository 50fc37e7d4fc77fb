"""`python -m stream_adapt` is the same as the `stream-adapt` command."""

from stream_adapt.cli import main

raise SystemExit(main())
