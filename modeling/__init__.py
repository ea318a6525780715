# Imported as `llm2clip4cxr.modeling`. transformers comes first: llm2clip4cxr registers these classes with the
# Auto classes when transformers is imported (llm2clip4cxr/registration.py), which imports every module here, so
# none of them may be half-imported at that moment. Checkpoints copy the model files, not this one.
import transformers  # noqa: F401
