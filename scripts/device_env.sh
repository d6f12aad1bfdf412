# Source on the lent GPU: installs the carried wheels (.whl/, from ../shared/tools/device-wheels.sh) into /tmp/site,
# assembles the accel package in /tmp/pkg (accel/, with each top-level source folder merged into its index package,
# as pyproject.toml's package-dir maps them) and puts both on PYTHONPATH.
# Source it from the repo root; then run from /tmp: the repo's own ./accel folder would shadow the assembled package.
REPO=$(pwd)
pip install -q --no-deps --target /tmp/site .whl/*.whl  # fails loudly without .whl/ (device-wheels.sh)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/accel  # cp -r into an existing folder would nest the copy
cp -r accel/. /tmp/pkg/accel/ && for d in kernels pipelines eval demos; do cp -r $d/. /tmp/pkg/accel/$d/; done
export REPO PYTHONPATH=/tmp/site:/tmp/pkg PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
