"""Registration of the package's models with transformers' Auto classes, without importing transformers when the
package is imported.

`import llm2clip4cxr` is a promise: afterwards `AutoModel.from_pretrained(path)` (and AutoConfig, AutoProcessor,
AutoImageProcessor, AutoModelForZeroShotImageClassification) loads a checkpoint of this package with its own
classes and no `trust_remote_code`. Registering at import time would import torch and transformers (seconds),
which the command line's --help, and anyone importing a light module of the package, should not pay. So
`register_when_transformers_loads()` (called by the package's `__init__`) registers at the first moment both
are imported:

* transformers is already imported: register now;
* otherwise a one-shot finder on `sys.meta_path` waits for `import transformers`: it lets the normal finders
  locate transformers, wraps the loader so that the registration runs right after transformers' own
  `__init__` has executed (before the importing code gets the module), and removes itself at once, so it
  sees no other import and costs nothing afterwards.

A PEP 562 `__getattr__` alone would not do: `import llm2clip4cxr; AutoModel.from_pretrained(...)` touches no
attribute of the package. The registration imports every model module, so none may be half-imported when it
runs: `llm2clip4cxr.modeling`'s `__init__` imports transformers before any model module starts (the first import
of transformers may come from one of them).
"""

import contextlib
import importlib.abc
import importlib.util
import sys

__all__ = ["register_auto_classes", "register_when_transformers_loads"]

# No lock: registering twice (two threads at once) is harmless, every call passes exist_ok=True.
_registered = False


def register_auto_classes() -> None:
    """Register LLM2Vec4CXR and LLM2CLIP4CXR with transformers' Auto classes (once; later calls do nothing)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
    )

    from .modeling.configuration_llm2clip4cxr import LLM2CLIP4CXRConfig
    from .modeling.configuration_llm2vec4cxr import LLM2Vec4CXRConfig
    from .modeling.modeling_llm2clip4cxr import LLM2CLIP4CXRModel
    from .modeling.modeling_llm2vec4cxr import LLM2Vec4CXRModel
    from .modeling.processing_llm2clip4cxr import LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRProcessor

    AutoConfig.register(LLM2Vec4CXRConfig.model_type, LLM2Vec4CXRConfig, exist_ok=True)
    AutoModel.register(LLM2Vec4CXRConfig, LLM2Vec4CXRModel, exist_ok=True)
    AutoConfig.register(LLM2CLIP4CXRConfig.model_type, LLM2CLIP4CXRConfig, exist_ok=True)
    AutoModel.register(LLM2CLIP4CXRConfig, LLM2CLIP4CXRModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(LLM2CLIP4CXRConfig, LLM2CLIP4CXRModel, exist_ok=True)
    # One plain-torch implementation serves whichever backend AutoImageProcessor asks for (it needs neither
    # torchvision nor Pillow), so no "backend not available" fallback warning is logged.
    AutoImageProcessor.register(
        LLM2CLIP4CXRConfig,
        image_processor_classes={"torchvision": LLM2CLIP4CXRImageProcessor, "pil": LLM2CLIP4CXRImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(LLM2CLIP4CXRConfig, LLM2CLIP4CXRProcessor, exist_ok=True)
    _registered = True


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first `import transformers` it hands back transformers' own spec with a
    loader that registers the Auto classes once transformers has executed, and leaves `sys.meta_path`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)  # the other finders, now that this one is gone
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec  # None: transformers is not installed, and the import fails as it would anyway


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # transformers sees (and keeps) its own loader; this wrapper exists only for the length of the import.
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        register_auto_classes()


_hook = _RegisterAfterTransformers()


def _remove_hook() -> None:
    with contextlib.suppress(ValueError):  # already removed
        sys.meta_path.remove(_hook)


def register_when_transformers_loads() -> None:
    """Register now if transformers is imported, else as soon as it is (see the module docstring)."""
    if _registered:
        return
    if "transformers" in sys.modules:
        register_auto_classes()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
