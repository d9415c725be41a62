#!/usr/bin/env bash
# Runs tools/sanitize_driver.py (small cases of every CUDA kernel path, and the engine around them) under
# compute-sanitizer's memcheck, racecheck, synccheck and initcheck; writes one summary line per tool.
#
#   tools/sanitize.sh [SUMMARY_FILE]          default bench/results/sanitizer.txt (relative to the repository)
#
# Environment: TOOLS (default "memcheck racecheck synccheck initcheck"), PYTHON (default python),
# COMPUTE_SANITIZER (default: on PATH, else $CUDA_HOME/bin, else /usr/local/cuda/bin), DRIVER_ARGS (passed to
# the driver, e.g. "--groups attention,sample"), LOG_DIR (full logs; default a fresh temporary folder),
# ALL_KERNELS=1 (instrument torch's kernels too, not only pass_ext's), TOOL_TIMEOUT (seconds per tool, default 900).
# Exit status: 0 when every tool reports no error and every driver check passes, 1 otherwise.
set -u -o pipefail

cd "$(dirname "$0")/.."
summary=${1:-bench/results/sanitizer.txt}
python=${PYTHON:-python}
tools=${TOOLS:-memcheck racecheck synccheck initcheck}
log_dir=${LOG_DIR:-$(mktemp -d -t pass_ext_sanitize.XXXXXX)}
mkdir -p "$log_dir" "$(dirname "$summary")"

cs=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for candidate in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  [[ -n "$cs" ]] && break
  [[ -x "$candidate" ]] && cs=$candidate
done
if [[ -z "$cs" || ! -x "$cs" ]]; then
  echo "compute-sanitizer not found: put it on PATH or set COMPUTE_SANITIZER" >&2
  exit 1
fi

# A distinctive exit status tells "the tool found errors" apart from "the driver failed" (1) or crashed.
error_exit=86
help=$("$cs" --help 2>&1)
common=(--error-exitcode "$error_exit" --target-processes all)
# Only our kernels: torch's are not under test, and instrumenting them multiplies the run time.
[[ "${ALL_KERNELS:-0}" == 1 ]] || common+=(--kernel-name kns=pass_ext)

{
  echo "# compute-sanitizer over tools/sanitize_driver.py $(date -u +%Y-%m-%dT%H:%MZ)"
  dirty=$(git diff --quiet 2>/dev/null || echo ' (modified)')
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$dirty"
  echo "# $("$cs" --version 2>&1 | grep -i version | head -1)"
  echo "# $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "# $("$python" -c 'import torch, pass_ext
print("torch", torch.__version__, "cuda", torch.version.cuda, "pass_ext", pass_ext.build_info())' 2>&1 | tail -1)"
} > "$summary"

status=0
for tool in $tools; do
  args=("${common[@]}" --tool "$tool")
  env_vars=()
  driver_args=()
  case $tool in
    memcheck)
      # torch's caching allocator serves tensors from larger blocks, so a read past a tensor's end would land in
      # valid memory; without it every tensor is its own cudaMalloc, and padding keeps neighbours apart.
      env_vars+=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
      grep -q -- "--padding" <<<"$help" && args+=(--padding 256)
      ;;
    initcheck)
      # Fresh allocations per tensor: memory a kernel should have written but did not reads as uninitialised.
      # Only the op groups, whose inputs are all copied from the host: memory that torch's own (unchecked)
      # kernels wrote would look uninitialised to the tool.
      env_vars+=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
      [[ "${ALL_KERNELS:-0}" == 1 ]] || driver_args+=(--groups attention,sample,verify,linear)
      ;;
    racecheck)
      args+=(--racecheck-report analysis)
      # Shared-memory races live inside our kernels, which the op groups run in every configuration. With the
      # engine group (whole models, graphs) racecheck on the H200 stopped with "Internal Sanitizer Error:
      # failed to handle a hardware exception" inside a torch kernel, after the op groups ran clean.
      [[ "${ALL_KERNELS:-0}" == 1 ]] || driver_args+=(--groups attention,sample,verify,linear)
      ;;
  esac
  log="$log_dir/$tool.log"
  start=$(date +%s)
  timeout -k 30 "${TOOL_TIMEOUT:-900}" env ${env_vars[@]+"${env_vars[@]}"} "$cs" "${args[@]}" \
    "$python" tools/sanitize_driver.py ${driver_args[@]+"${driver_args[@]}"} ${DRIVER_ARGS:-} >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  # memcheck, synccheck, initcheck end with "ERROR SUMMARY: N errors"; racecheck with
  # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)".
  errors=$(grep -aoE 'ERROR SUMMARY: [0-9]+ error' "$log" | tail -1 | grep -oE '[0-9]+' || true)
  [[ -n "$errors" ]] || errors=$(grep -aoE 'RACECHECK SUMMARY: .*\([0-9]+ errors?' "$log" | tail -1 \
                                 | grep -oE '[0-9]+ errors?' | grep -oE '[0-9]+' || true)
  warnings=$(grep -aoE 'RACECHECK SUMMARY: .*\([0-9]+ errors?, [0-9]+ warnings?\)' "$log" | tail -1 \
             | grep -oE '[0-9]+ warnings?' | grep -oE '[0-9]+' || true)
  if grep -aq "sanitize_driver: ok" "$log"; then driver=ok
  elif grep -aq "sanitize_driver: .*checks failed" "$log"; then driver="checks failed"
  else driver="did not finish"; fi
  cases=$(grep -aoE '^[a-z]+: [0-9]+ cases' "$log" | awk '{n += $2} END {print n + 0}')
  notes=$(grep -ac '^note ' "$log" || true)  # CPU/CUDA differences the driver reports without failing
  if [[ $rc -eq 0 && "${errors:-x}" == 0 && $driver == ok ]]; then verdict=clean
  elif [[ $rc -eq $error_exit || "${errors:-0}" != 0 ]]; then verdict=ERRORS
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then verdict="TIMED OUT"
  else verdict="FAILED (exit $rc)"; fi
  [[ $verdict == clean ]] || status=1
  line=$(printf '%-10s %-16s errors %-4s warnings %-4s cases %-4s notes %-3s driver %-14s %4ds' "$tool" \
         "$verdict" "${errors:-?}" "${warnings:--}" "$cases" "$notes" "$driver" "$secs")
  echo "$line" | tee -a "$summary"
  if [[ $verdict != clean ]]; then  # the first reports (or the last words), so the summary says what to look at
    { grep -aE '^========= (Invalid|Error|Race|Barrier|Uninitialized|Program hit|Warning)|^FAIL |^[A-Za-z.]*Error: ' \
        "$log" || tail -n 4 "$log"; } | head -n 8 | sed 's/^/    /' | tee -a "$summary"
  fi
done
echo "summary written to $summary; logs in $log_dir"
exit $status
