"""Where the loader nodes look for models (mirrors upstream's top-level ``folder_paths.py``).

The models folder is ``$COMFYUI_MODELS_DIR`` or ``./models``; diffusion models live in
``<models>/diffusion_models`` and LoRAs in ``<models>/loras``. A full path is accepted too.
"""
import os

SUPPORTED_EXTENSIONS = (".safetensors", ".sft")
FOLDERS = {"diffusion_models": "diffusion_models", "unet": "diffusion_models", "loras": "loras"}


def models_dir():
    return os.path.abspath(os.environ.get("COMFYUI_MODELS_DIR", "models"))


def get_folder_paths(folder_name):
    return [os.path.join(models_dir(), FOLDERS[folder_name])]


def get_filename_list(folder_name):
    out = []
    for base in get_folder_paths(folder_name):
        for root, _dirs, files in os.walk(base):
            out += [os.path.relpath(os.path.join(root, f), base) for f in files if f.endswith(SUPPORTED_EXTENSIONS)]
    return sorted(out)


def get_full_path_or_raise(folder_name, filename):
    if os.path.isfile(filename):
        return filename
    for base in get_folder_paths(folder_name):
        path = os.path.join(base, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{filename} not found as a path nor in {get_folder_paths(folder_name)}")
