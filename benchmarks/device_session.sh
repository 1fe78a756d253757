#!/usr/bin/env bash
# What a lent accelerator session runs, in one call of at most ten minutes:
#
#   bash benchmarks/device_session.sh
#
# from the repository root, on the accelerator machine's own jax, optax and torch (the
# repository goes on PYTHONPATH; nothing is installed). Each stage has a time limit of its
# own so that a slow one leaves time for the rest, and writes its whole log under $OUT
# (default: device_out/), which the device tool brings back:
#
#   card.txt            the accelerator and the software versions
#   device_check.txt    values and gradients on the accelerator against the host CPU
#                       (benchmarks/device_check.py; exits 1 past its tolerances)
#   bench_core.txt, bench_chains_linear.txt
#                       jcce's implementations beside optax and the unfused linear loss,
#                       at the accelerator shapes (benchmarks/bench_backends.py)
#   pytest.txt          the numerical suites (conftest.py runs most under both
#                       implementations) on the accelerator (issue 14, item 7)
#
# Stage limits (seconds) can be set from the environment: CHECK_S, CORE_S, LINEAR_S,
# TESTS_S (120 + 150 + 180 + 120: the whole within a call's ten minutes).
#
# With device time left after it, a second call can count the kernels that touch the
# logits and time each (issue 15's pass count, measured on the card):
#   python3 benchmarks/profile_thunks.py --chain "4-transform chain" \
#     --implementation xla --dtype bfloat16 --shape 8192x131072 --top 25
set -u
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Several pytest workers share one card: allocate on demand, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax, jaxlib, optax; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, 'optax', optax.__version__); print(jax.devices())" 2>&1
} | tee "$out/card.txt"

status=0
stage() {  # stage NAME SECONDS LINES COMMAND... (LINES of its log echoed at the end)
  local name=$1 limit=$2 lines=$3
  shift 3
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n "$lines" "$out/$name.txt"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

stage device_check "${CHECK_S:-120}" 60 python3 benchmarks/device_check.py
# The benchmark in two calls, so that a slow section does not cost the other's table.
stage bench_core "${CORE_S:-150}" 60 python3 benchmarks/bench_backends.py --only core
stage bench_chains_linear "${LINEAR_S:-180}" 60 python3 benchmarks/bench_backends.py \
  --only chains,linear
# -v writes each result as it comes, so a run cut off by its limit still names its
# failures (pytest.txt keeps every line; the summary below counts them).
stage pytest "${TESTS_S:-120}" 2 python3 -m pytest -v -n 4 -p no:randomly \
  tests/test_core.py tests/test_family_losses.py tests/test_linear.py \
  tests/test_optax_parity.py tests/test_properties.py tests/test_torch_parity.py \
  tests/test_edges.py tests/test_objectives.py tests/test_pallas.py
echo "== pytest: $(grep -c ' PASSED' "$out/pytest.txt") passed, \
$(grep -c ' FAILED' "$out/pytest.txt") failed, $(grep -c ' SKIPPED' "$out/pytest.txt") skipped"
grep ' FAILED' "$out/pytest.txt" | head -n 40
exit $status
