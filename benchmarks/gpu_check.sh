#!/usr/bin/env bash
# The GPU checks in one call on a lent CUDA machine (its own python3 holds a CUDA build of PyTorch):
#   1. the CUDA tests of the suite (PyTorch scan on the GPU; mamba-ssm's kernel against the fp64 reference loop);
#   2. benchmarks/st_dlpfc.py on DLPFC 151673 with the "paper" preset (what preset="auto" picks on a GPU), with
#      the neighbour-mean baseline of the same run, and with the CPU preset on the GPU;
#   3. benchmarks/scan_speed.py on the GPU: the PyTorch scan against mamba-ssm's fused kernel.
# mamba-ssm has no wheel for every CUDA/PyTorch pair: its selective-scan extension is built here from the
# sdist, for this GPU's architecture only (its setup.py builds nine with CUDA 13: too long for a short lease),
# in the background while the paper preset runs (on the PyTorch scan; once more on mamba-ssm's if time is left).
#
# Carried next to the checkout (ignored by git): .whl/ (wheels of what the machine lacks: scanpy, anndata and
# their dependencies), .devkit/ (the DLPFC .h5ad files of ../shared/data/dlpfc and mamba_ssm-*.tar.gz).
# Made on the workstation by `bash benchmarks/gpu_kit.sh` (the list of wheels is there).
# Usage (repository root):  bash benchmarks/gpu_check.sh [SECONDS [STEPS]]
#   SECONDS: the budget (default 540); STEPS: "all" (default) or a comma-separated subset of tests,paper,cpu,scan.
#   A lease of 15 minutes did not leave the paper preset enough time among the other steps (docs/spatial.md):
#   `bash benchmarks/gpu_check.sh 540 paper` gives it the whole budget (and builds nothing).
set -u -o pipefail
BUDGET=${1:-540}
STEPS=${2:-all}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=python3
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
until_left() { local s=$(($(left) - $1)); echo $((s < 5 ? 5 : s)); } # seconds until only $1 are left
want() { [[ $STEPS == all || ,$STEPS, == *,$1,* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, scanpy, anndata, dfmamba_st as d; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'scanpy', scanpy.__version__, 'anndata', anndata.__version__, 'dfmamba_st', d.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
say "set up"

# --- mamba-ssm's selective_scan_cuda, built in the background -------------------------------------------------
MS=/tmp/mamba_ssm
BUILD=""
if want tests || want cpu || want scan; then
mkdir -p $MS/build && tar xzf .devkit/mamba_ssm-*.tar.gz -C $MS --strip-components 1
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
(
    cd $MS && TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=16 $PY - <<'EOF'
import glob
from torch.utils.cpp_extension import load

src = "csrc/selective_scan"
half = [f"-U__CUDA_NO_{t}_{k}__" for t in ("HALF", "BFLOAT16", "BFLOAT162") for k in ("OPERATORS", "CONVERSIONS")]
load(  # the flags of mamba-ssm's setup.py, minus its list of architectures (TORCH_CUDA_ARCH_LIST gives this GPU's)
    name="selective_scan_cuda",
    sources=[f"{src}/selective_scan.cpp", *sorted(glob.glob(f"{src}/selective_scan_*.cu"))],
    extra_include_paths=[src],
    extra_cflags=["-O3", "-std=c++17"],
    extra_cuda_cflags=["-O3", "-std=c++17", *half, "--expt-relaxed-constexpr", "--expt-extended-lambda",
                       "--use_fast_math", "-lineinfo"],
    build_directory="build",
    verbose=False,
)
print("built selective_scan_cuda")
EOF
) >"$OUT/mamba_build.log" 2>&1 &
BUILD=$!
say "mamba-ssm build started (sm_${CAP/./})"
fi

# --- 1a. CUDA tests that need no mamba-ssm -------------------------------------------------------------------
if want tests; then
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_scan.py tests/test_training.py \
        tests/test_reliability.py -k "cuda or device" 2>&1 | tee "$OUT/pytest_torch_cuda.log" | tail -4
    say "tests without mamba-ssm done"
fi

# --- 2a. the paper preset (what preset="auto" picks on a GPU), PyTorch scan, and the baseline ----------------
ST="$PY benchmarks/st_dlpfc.py --slices 151673 --no-extra --threads 8 --data-dir .devkit"
if want paper; then
    [[ $STEPS == paper ]] && rest=10 || rest=200
    # one seed per call, the paper preset before its baseline (the benchmark runs method by method): a budget too
    # short for three seeds still gives the first seed's pair, or at least its paper-preset run
    for seed in 0 1 2; do
        if [ "$(left)" -le $((rest + 30)) ]; then say "paper preset: no time left for seed $seed"; break; fi
        timeout "$(until_left $rest)" $ST --seeds $seed --methods dfmamba_st pca_nbmean_gmm \
            --embed preset=paper device=cuda >"$OUT/st_paper_preset_s$seed.log" 2>&1
        say "paper preset, seed $seed, done"
    done
fi

# --- 1b. mamba-ssm against the reference (the build is given until 160 s are left) -----------------------------
if [ -n "$BUILD" ]; then
    while kill -0 $BUILD 2>/dev/null && [ "$(left)" -gt 160 ]; do sleep 5; done
    if kill -0 $BUILD 2>/dev/null; then
        say "mamba-ssm build still running: stopped"
        kill $BUILD
    fi
    tail -2 "$OUT/mamba_build.log"
    export PYTHONPATH=$MS/build:$MS:$PYTHONPATH
    if ! $PY -c "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn" 2>"$OUT/mamba_import.log"; then
        # a guard: mamba_ssm/__init__.py imports its whole model zoo; the scan needs only the op module
        echo "mamba_ssm import failed ($(tail -1 "$OUT/mamba_import.log")); package __init__ emptied" |
            tee -a "$OUT/gpu.txt"
        echo '__version__ = "sdist"' >$MS/mamba_ssm/__init__.py
    fi
fi
$PY -c "from dfmamba_st.core.scan import available_backends, resolve_backend as r
print('scan backends:', available_backends(), '| auto on cuda ->', r('auto', 'cuda'))" | tee -a "$OUT/gpu.txt"
if want tests; then
    timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_scan.py -k "cuda" 2>&1 | tee "$OUT/pytest_mamba.log" |
        tail -4
    say "mamba-ssm tests done"
fi

# --- 2b. the CPU preset on the GPU (scan backend "auto": mamba-ssm's kernel where it built) -------------------
if want cpu; then
    timeout "$(until_left 70)" $ST --seeds 0 1 2 --methods dfmamba_st --embed preset=cpu device=cuda \
        >"$OUT/st_cpu_preset.log" 2>&1
    say "CPU preset on the GPU done"
fi

# --- 3. scan backends on the GPU -----------------------------------------------------------------------------
if want scan; then
    timeout "$(until_left 12)" $PY benchmarks/scan_speed.py --device cuda --backends torch cuda \
        --lengths 1024 16384 --d-inner 1024 6000 --reps 5 --timeout 25 --json "$OUT/scan_speed.json" \
        >"$OUT/scan_speed.log" 2>&1
    say "scan speed done"
fi

# --- 2c. with what is left: the paper preset once more, seed 0, on mamba-ssm's kernel --------------------------
if want paper && [ -n "$BUILD" ] && [ "$(left)" -gt 80 ]; then
    timeout "$(until_left 10)" $ST --seeds 0 --methods dfmamba_st --embed preset=paper device=cuda \
        >"$OUT/st_paper_preset_mamba.log" 2>&1
    say "paper preset (auto scan backend) done"
fi

echo "===== summary"
cat "$OUT/gpu.txt"
for f in pytest_torch_cuda pytest_mamba; do
    [ -f "$OUT/$f.log" ] && echo "-- $f" && grep -E "passed|failed|error" "$OUT/$f.log" | tail -2
done
for f in st_paper_preset_s0 st_paper_preset_s1 st_paper_preset_s2 st_cpu_preset st_paper_preset_mamba; do
    [ -f "$OUT/$f.log" ] && echo "-- $f" && grep -E "ARI|^ *151673|slice|Error" "$OUT/$f.log"
done
[ -f "$OUT/scan_speed.log" ] && echo "-- scan_speed" && grep "^|" "$OUT/scan_speed.log"
say "end"
