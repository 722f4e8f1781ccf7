#!/usr/bin/env bash
# On the GPU machine: install the carried wheels (tests_quant/gpu_prepare.sh) into /tmp/site, the
# optional ones only where the image lacks the module; say which modules the image lacks.
set -u
P="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site"
$P .whl/*.whl || exit 1
for pair in psutil:psutil yaml:pyyaml tqdm:tqdm regex:regex PIL:none scipy:none transformers:none \
            tokenizers:none safetensors:none numpy:none torchvision:none torchaudio:none; do
  mod=${pair%%:*}; pkg=${pair##*:}
  if python3 -c "import $mod" 2>/dev/null; then echo "have $mod"; else
    echo "MISSING $mod"
    if [ "$pkg" != none ]; then $P .whl/opt/$pkg-*.whl && echo "  installed $pkg from .whl/opt"; fi
  fi
done
