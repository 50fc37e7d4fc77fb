#!/usr/bin/env bash
# The README's evaluation, all three protocols, 3 seeds: `stream-adapt evaluate` on MovieLens 100K.
#
#   benchmarks/eval_movielens.sh /path/to/ml-100k/u.data [OUT_DIR] [extra evaluate flags...]
#
# OUT_DIR defaults to docs/eval; each protocol writes OUT_DIR/<protocol>/report.{json,md} (+ PNG plots).
# Extra flags go to every run, e.g. `--meta-init`, `--set pipeline.adapt.lr=0.01`, `--no-plots`,
# `--validation`. The data is never copied: get it with the GroupLens download (its license forbids
# redistribution), e.g. shared/tools/fetch-movielens-100k.
# About 2 minutes on 2 cores (prequential ~90 s); with --meta-init about 10 minutes.
set -euo pipefail
data=${1:?usage: $0 PATH/u.data [OUT_DIR] [evaluate flags...]}
out=${2:-docs/eval}
shift $(( $# >= 2 ? 2 : 1 ))
bin=${STREAM_ADAPT:-stream-adapt}
command -v "$bin" >/dev/null || bin=".venv/bin/stream-adapt"
for protocol in prequential cold-start melu; do
    echo "== $protocol -> $out/$protocol" >&2
    "$bin" evaluate --events "$data" --protocol "$protocol" --report "$out/$protocol" --seeds 0,1,2 --quiet "$@" \
        > /dev/null
done
echo "reports in $out/{prequential,cold-start,melu}/report.md" >&2
