#!/usr/bin/env bash
# Makes what benchmarks/gpu_check.sh carries to a lent GPU machine, next to the checkout and ignored by git:
#   .whl/     wheels of what that machine lacks (scanpy, anndata and their dependencies; requests and its own, for
#             pooch and tests/test_io_edges.py), for its Python 3.12 on x86-64 Linux;
#   .devkit/  the DLPFC .h5ad files of ../shared/data/dlpfc and mamba-ssm's sdist (its CUDA scan is built there).
# The machine has its own Python 3.12 with a CUDA build of torch, numpy, pandas, numba, scikit-learn, matplotlib...
# Run once per workstation (the files do not survive a new one), from the repository root; needs the package
# registry, nothing else. Then, on the device machine:
#   bash benchmarks/gpu_check.sh 540 paper     (carry .whl and .devkit)
# Usage: bash benchmarks/gpu_kit.sh [DATA_DIR]   (default ../shared/data/dlpfc)
set -euo pipefail
DATA=${1:-../shared/data/dlpfc}
ls "$DATA"/*.h5ad >/dev/null || { echo "no .h5ad files in $DATA" >&2; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl .devkit
rm -f .whl/*.whl .devkit/mamba_ssm-*.tar.gz  # no second version of a wheel from an earlier run (pip would refuse both)
for path in /.whl/ /.devkit/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done
pip download -q -d .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    scanpy==1.11.5 anndata==0.12.19 legacy-api-wrap==1.5 natsort==8.4.0 session-info2==0.4.1 \
    umap-learn==0.5.12 pynndescent==0.7.0 array-api-compat==1.16.0 scverse-misc==0.0.3 zarr==3.1.6 \
    donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6 pooch==1.9.0 platformdirs==4.14.9 \
    scikit-misc==0.5.3 requests==2.34.2 charset-normalizer==3.5.3 idna==3.21 urllib3==2.8.0 \
    certifi==2026.10.19.post1
MAMBA_SKIP_CUDA_BUILD=TRUE pip download -q -d .devkit --no-deps --no-binary :all: --no-build-isolation \
    mamba-ssm==2.3.2.post1
cp "$DATA"/*.h5ad .devkit/
echo "made .whl ($(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)) and .devkit ($(du -sh .devkit | cut -f1))"
