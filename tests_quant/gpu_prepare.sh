#!/usr/bin/env bash
# Prepare, here, what tests_quant/gpu_dynamic_vram.py needs on the lent GPU machine (which reaches no
# package registry): four git-ignored folders to carry, about 62 MB in all.
#   .gpu-site  slim comfy-kitchen (../shared/tools/gpu-site.sh)
#   .whl       wheels the GPU image lacks (comfy-aimdo, torchsde, trampoline, einops; psutil, pyyaml,
#              tqdm, regex in .whl/opt, installed there only where missing)
#   .upstream  a trimmed copy of ../shared/upstream/ComfyUI with comfy/quant_tools/upstream/comfyui.patch
#              applied and this checkout's comfy/quant in it
#   .gpu-demo  the demo's int4 model and LoRA
# Then, on the GPU (carry the four folders): bash tests_quant/gpu_setup.sh &&
#   PYTHONPATH=$PWD/.gpu-site:/tmp/site python3 tests_quant/gpu_dynamic_vram.py .upstream $OUT
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .gpu-site .whl .upstream .gpu-demo; do
  grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
../shared/tools/gpu-site.sh
dl="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
rm -rf .whl && mkdir -p .whl/opt
$dl -d .whl comfy-aimdo==0.4.10 torchsde==0.2.6 trampoline==0.1.2 einops==0.8.2
$dl -d .whl/opt psutil pyyaml tqdm regex
rm -rf .upstream && cp -r ../shared/upstream/ComfyUI .upstream && chmod -R u+w .upstream
# patch(1), not git apply: inside this repository git apply would resolve paths against its root and skip every file
(cd .upstream && patch -p1 -s < ../comfy/quant_tools/upstream/comfyui.patch)
mkdir -p .upstream/comfy/quant && cp -r comfy/quant/. .upstream/comfy/quant/
find .upstream -name __pycache__ -prune -exec rm -rf {} +
(cd .upstream && rm -rf .git blueprints comfy_api_nodes tests tests-unit openapi.yaml \
   comfy/sd1_tokenizer comfy/text_encoders/qwen25_tokenizer comfy/text_encoders/qwen35_tokenizer &&
   find . -name "*.json" -size +200k -delete)
python3 -m comfy.quant demo --workdir .gpu-demo > /dev/null && rm .gpu-demo/qwen_image_demo_bf16.safetensors
du -shc .gpu-site .whl .upstream .gpu-demo | tail -1
