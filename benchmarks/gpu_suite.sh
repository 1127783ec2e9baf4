#!/usr/bin/env bash
# One prepared GPU benchmark run (issue 26): jaxdiff vs PyTorch on the UNet, the pipelines, the SD2
# training step and a profiler trace, on a fresh machine with JAX (CUDA), flax, optax, PyTorch and
# transformers but no diffusers and no network. Results go to OUT_DIR as at most three files:
#   suite.json       every part's JSON report, exit status, time and command; the GPU; versions
#   suite.log        the suite's own log and the tail of every part's log
#   trace.json.gz    the Perfetto trace of the SD1.5 UNet batch-16 calls (when under 15 MB)
# Both are rewritten after every part, so a run cut short still leaves what finished.
#
#   benchmarks/gpu_suite.sh OUT_DIR            # the GPU run, ~7 minutes on one H200
#   benchmarks/gpu_suite.sh OUT_DIR --tiny     # the same parts on the `tiny` preset (a CPU check)
#
# diffusers (and any of its pure-python deps the machine lacks) is installed from the wheel folder
# .whl/ at the repo root into /tmp/site. Environment: GPU_SUITE_BUDGET_S (seconds for all parts;
# default 440, tiny 1500), GPU_SUITE_WORK (scratch folder, default /tmp/gpu_suite),
# GPU_SUITE_TORCH_COMPILE=0/1 (the torch.compile part; default on, off with --tiny), GPU_SUITE_SKIP="name
# ..." (parts not to run, e.g. on a second run for the ones the budget left out).
# Every part runs under `timeout` (its own cap, never past the budget); a part that fails or is cut
# off costs only itself. Parts run in priority order and are skipped once the budget is spent.
set -u
OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--tiny]}
TINY=0
if [[ "${2:-}" == "--tiny" || "${GPU_SUITE_TINY:-0}" == "1" ]]; then TINY=1; fi
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
WORK=${GPU_SUITE_WORK:-/tmp/gpu_suite}
if (( TINY )); then BUDGET=${GPU_SUITE_BUDGET_S:-1500}; else BUDGET=${GPU_SUITE_BUDGET_S:-440}; fi
TORCH_COMPILE=${GPU_SUITE_TORCH_COMPILE:-$(( 1 - TINY ))}
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=$WORK/xla_cache          # one persistent compile cache: later parts reuse earlier compiles
START=$SECONDS
: > "$WORK/parts.tsv"

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$WORK/suite.log" >&2; }

collect() {  # WORK -> OUT/suite.json + OUT/suite.log
  python3 - "$WORK" "$OUT" "$TINY" <<'PY'
import json, sys
from pathlib import Path
work, out, tiny = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
suite = {"tiny": tiny, "parts": {}}
gpu = work / "gpu.txt"
suite["gpu"] = gpu.read_text().strip() if gpu.exists() else None
logs = [(work / "suite.log").read_text() if (work / "suite.log").exists() else ""]
for line in (work / "parts.tsv").read_text().splitlines():
    name, rc, seconds, limit, command = line.split("\t", 4)
    part = {"rc": int(rc), "seconds": int(seconds), "timeout_s": int(limit), "command": command,
            "timed_out": int(rc) in (124, 137)}
    report = work / f"{name}.json"
    if report.exists():
        try:
            part["report"] = json.loads(report.read_text())
        except ValueError as e:
            part["report_error"] = str(e)
    suite["parts"][name] = part
    log = work / f"{name}.log"
    if log.exists():
        tail = log.read_text(errors="replace").splitlines()[-200:]
        logs.append(f"\n===== {name}: rc {rc}, {seconds} s (cap {limit} s)\n$ {command}\n" + "\n".join(tail))
(out / "suite.json").write_text(json.dumps(suite, indent=1, default=str))
(out / "suite.log").write_text("\n".join(logs)[-8_000_000:])
PY
}

part() {  # part NAME CAP_S ENV... -- CMD...: run under timeout, record, collect
  local name=$1 cap=$2
  shift 2
  local envs=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do envs+=("$1"); shift; done
  shift
  local cmd="$*"
  cmd=${cmd//$'\n'/ }; cmd=${cmd//$'\t'/ }        # one TSV field (the inline Python check is multi-line)
  local left=$(( BUDGET - (SECONDS - START) ))
  if [[ " ${GPU_SUITE_SKIP:-} " == *" $name "* ]] || (( left < 25 )); then
    log "skip $name: in GPU_SUITE_SKIP or $left s of the budget left"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" -1 0 0 "skipped: $cmd" >> "$WORK/parts.tsv"
    collect
    return 200
  fi
  (( cap > left )) && cap=$left
  log "start $name (cap ${cap}s): ${cmd:0:300}"
  local t0=$SECONDS
  env "${envs[@]}" timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  log "end $name: rc $rc after $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$cap" "$cmd" >> "$WORK/parts.tsv"
  collect
  return $rc
}

crashed() {  # exit status of `part` -> true when the command itself failed (not skipped, not cut off)
  (( $1 != 0 && $1 != 200 && $1 != 124 && $1 != 137 ))
}

# ----------------------------------------------------------------------------- setup: diffusers, GPU
export PYTHONPATH=$ROOT
if compgen -G "$ROOT/.whl/diffusers-*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/diffusers-*.whl >> "$WORK/suite.log" 2>&1 || log "diffusers wheel install failed"
  # Its pure-python deps and jaxdiff's, only where the machine lacks them (transformers brings most).
  for pair in PIL:pillow safetensors:safetensors tqdm:tqdm huggingface_hub:huggingface_hub regex:regex \
              filelock:filelock "requests:requests urllib3 idna charset_normalizer certifi"; do
    module=${pair%%:*}
    if ! python3 -c "import $module" 2> /dev/null; then
      wheels=()
      for stem in ${pair#*:}; do wheels+=("$ROOT"/.whl/fallback/"$stem"-*.whl); done
      log "installing ${pair#*:} from .whl/fallback (no $module here)"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" >> "$WORK/suite.log" 2>&1 || log "fallback install of ${pair#*:} failed"
    fi
  done
  export PYTHONPATH=/tmp/site:$ROOT
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  python3 -c "import jax, torch, diffusers, transformers; print('jax', jax.__version__, jax.devices(), '| torch', \
torch.__version__, torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| transformers', \
transformers.__version__)" 2>&1 | tail -1; } > "$WORK/gpu.txt"
log "machine: $(tr '\n' ' ' < "$WORK/gpu.txt")"
collect

# ----------------------------------------------------------------------------- the parts, by priority
if (( TINY )); then
  M15=tiny; MXL=tiny; MSD2=tiny; S15=64; SXL=64; B2=2; B16=4; B32=8; STEPS=2; REP=2; PIPE_REP=1
else
  M15=sd15; MXL=sdxl; MSD2=sd21; S15=512; SXL=1024; B2=2; B16=16; B32=32; STEPS=20; REP=10; PIPE_REP=3
fi
BENCH=(python3 -m jaxdiff bench --dtype bfloat16 --compile-cache "$CACHE")
TRAIN=(python3 benchmarks/train_bench.py --preset "$MSD2" --resolution "$S15" --cached-latents
       --dtype bfloat16 --warmup 2 --steps 5 --machine "$(head -1 "$WORK/gpu.txt")")
COMPARE=(python3 benchmarks/compare_torch.py --dtype bfloat16 --compile-cache "$CACHE")

# The cuDNN dispatch fix itself (issue 26): gradients through "cudnn" attention at SD's cross- and
# self-attention shapes against "xla", before the training run that needs them.
part cudnn_grad_check 60 -- python3 -c '
import json, sys, jax, jax.numpy as jnp, numpy as np
from jaxdiff.models.attention import attention
res = {"backend": jax.default_backend()}
for lq, lk, heads, causal in [(4096, 77, 5, False), (4096, 4096, 5, False), (77, 77, 12, True)]:
    key = f"{lq}x{lk}" + (" causal" if causal else "")
    try:
        q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, n, heads * 64)), jnp.bfloat16)
                   for i, n in enumerate((lq, lk, lk)))
        loss = lambda impl: lambda q, k, v: jnp.sum(attention(q, k, v, heads=heads, causal=causal,
                                                              implementation=impl).astype(jnp.float32) ** 2)
        got = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
        err = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))) /
                     jnp.max(jnp.abs(w.astype(jnp.float32)))) for g, w in zip(got, want)]
        res[key] = {"max_rel_err_dq_dk_dv": err}
    except Exception as e:
        res[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(res)
' "$WORK/cudnn_grad_check.json"
# (c) SD2 512^2 training, cached latents, bf16, batch 16: the step that crashed in cuDNN's backward.
# Falls back to XLA attention for a number if the cuDNN path still fails.
part train_b16 170 XLA_PYTHON_CLIENT_MEM_FRACTION=.92 -- "${TRAIN[@]}" --batch "$B16" --out "$WORK/train_b16.json"
if crashed $?; then
  part train_b16_xla_attention 120 XLA_PYTHON_CLIENT_MEM_FRACTION=.92 -- \
    "${TRAIN[@]}" --batch "$B16" --attention xla --out "$WORK/train_b16_xla_attention.json"
fi
# (a)+(b) UNet: jaxdiff's bench record (cold and cache-served compile, steady time, MFU) and PyTorch
# eager on the same GPU, same weights and inputs, alternating call by call.
part unet_sd15_vs_torch 130 -- "${COMPARE[@]}" --model "$M15" --what unet --batch "$B2,$B16" --size "$S15" \
  --warmup 3 --repeats "$REP" --json "$WORK/unet_sd15_vs_torch.json"
crashed $? && part unet_sd15 100 -- "${BENCH[@]}" --model "$M15" --what unet --batch "$B2,$B16" --size "$S15" \
       --warmup 3 --repeats "$REP" --json "$WORK/unet_sd15.json"
# (d) where the time goes: a profiler trace of SD1.5 UNet batch-16 calls, summarised by kernel.
part profile_unet_sd15 90 -- python3 benchmarks/profile_unet.py --preset "$M15" --batch "$B16" --size "$S15" \
  --dtype bfloat16 --calls 3 --trace-dir "$WORK/trace" --json "$WORK/profile_unet_sd15.json" \
  --keep-trace "$OUT/trace.json.gz" --max-trace-mb 15
part unet_sdxl_vs_torch 150 -- "${COMPARE[@]}" --model "$MXL" --what unet --batch "$B2" --size "$SXL" \
  --warmup 3 --repeats "$REP" --json "$WORK/unet_sdxl_vs_torch.json"
crashed $? && part unet_sdxl 110 -- "${BENCH[@]}" --model "$MXL" --what unet --batch "$B2" --size "$SXL" \
       --warmup 3 --repeats "$REP" --json "$WORK/unet_sdxl.json"
# (a) pipelines: SD1.5 1 image, SDXL 4 images, 20 Euler steps with CFG (last: issue 26 has measured them).
part pipeline_sd15 100 -- "${BENCH[@]}" --model "$M15" --what pipeline --batch 1 --size "$S15" --steps "$STEPS" \
  --warmup 1 --repeats "$PIPE_REP" --json "$WORK/pipeline_sd15.json"
part pipeline_sdxl 140 -- "${BENCH[@]}" --model "$MXL" --what pipeline --batch 4 --size "$SXL" --steps "$STEPS" \
  --warmup 1 --repeats "$PIPE_REP" --json "$WORK/pipeline_sdxl.json"
# If time is left: training at batch 32, and torch.compile on the SD1.5 UNet (JAX served by the cache).
part train_b32 150 XLA_PYTHON_CLIENT_MEM_FRACTION=.92 -- "${TRAIN[@]}" --batch "$B32" --out "$WORK/train_b32.json"
if (( TORCH_COMPILE )); then
  part unet_sd15_vs_torch_compile 200 -- "${COMPARE[@]}" --model "$M15" --what unet --batch "$B2,$B16" \
    --size "$S15" --warmup 2 --repeats "$REP" --no-cached-compile --torch-compile \
    --json "$WORK/unet_sd15_vs_torch_compile.json"
fi
log "done in $((SECONDS - START)) s"
collect
exit 0
