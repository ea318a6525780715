"""Converters from published weights to checkpoints this package loads, one module per published layout, each
with its declarative key-mapping table (`KEY_MAPPING`) and the steps load -> rename -> check -> save:

- `llm2vec4cxr`: the published LLM2Vec4CXR Hub folder -> an `LLM2Vec4CXRModel` checkpoint;
- `llm2clip4cxr`: the published LLM2CLIP4CXR state dict -> an `LLM2CLIP4CXRModel` checkpoint (EVA02 vision tower);
- `open_clip`: an open_clip BiomedCLIP checkpoint -> `transformers` ViT and BERT modules (a baseline);
- `weights`: what they share (safe weight reading, renaming by a table, key and shape checks, atomic saves).

docs/compatibility.md lists the key tables.
"""

from .llm2clip4cxr import convert_llm2clip4cxr
from .llm2vec4cxr import convert_llm2vec4cxr
from .weights import load_state_dict_file

__all__ = ["convert_llm2clip4cxr", "convert_llm2vec4cxr", "load_state_dict_file"]
