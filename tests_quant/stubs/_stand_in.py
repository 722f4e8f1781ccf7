"""Import-time stand-ins for packages that cannot be installed next to CPU torch 2.13 (torchvision,
torchaudio, av), used only by ``tests_quant/upstream_env.py`` when it runs upstream ComfyUI in a
subprocess (this folder is put on that subprocess's PYTHONPATH, never on the test process's).

Upstream imports these on its diffusion-model path only to define names (``from torchvision.ops import
roi_align``, ``from av.container import InputContainer``, ...); nothing on that path calls them. Every
name defined here is a class that raises :class:`StandInUsed` when it is called or instantiated and
:class:`StandInMissing` when an attribute is read from it; each module raises StandInMissing for any other
name looked up on it. So a test that does reach one
fails saying so instead of computing with something fake.
"""


class StandInUsed(RuntimeError):
    """A stand-in was called or instantiated."""


class StandInMissing(AttributeError):
    """A name was looked up on a stand-in (an AttributeError, so ``hasattr`` and the import system's
    ``from package import submodule`` keep working)."""


def _message(qualname):
    package = qualname.split(".")[0]
    return (f"{qualname} was used, but {package} is a test stand-in here (tests_quant/stubs: {package} cannot "
            f"be installed next to CPU torch); the code under test must not need it")


class _StandInMeta(type):
    def __call__(cls, *args, **kwargs):
        raise StandInUsed(_message(cls.__qualname__))

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise StandInMissing(_message(f"{cls.__qualname__}.{name}"))


def stand_in(qualname):
    """A class named ``qualname`` (e.g. ``"torchvision.ops.roi_align"``) that raises when used."""
    module, _, name = qualname.rpartition(".")
    return _StandInMeta(name, (), {"__qualname__": qualname, "__module__": module})


def module_getattr(module_name):
    """A module-level ``__getattr__`` that raises for every name the stand-in does not define."""
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise StandInMissing(_message(f"{module_name}.{name}"))
    return __getattr__
