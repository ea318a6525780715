"""One load check of `verify.verify_checkpoint`, in a fresh interpreter: `python -P verify_worker.py MODE KIND
PATH BASE SAMPLE OUT_FILE`.

Run as a script, not as `-m llm2clip4cxr.hub.verify_worker`: MODE "hub" must load the folder as a Hub user
without this package does (`remote_code`, and `sentence_transformers` for a text encoder), so llm2clip4cxr
must not be imported at all; MODE "package" imports it first (`package`). Each check's result goes as JSON
to OUT_FILE (stdout may carry library messages); a failing check does not stop the next one. Nothing here may
import llm2clip4cxr at module level.
"""

import importlib.abc
import json
import sys


class RefuseThisPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm2clip4cxr":
            raise ImportError("the checkpoint's own code must load it, without the llm2clip4cxr package")


def load_model(mode: str, kind: str, path: str, base: str, sample: str) -> dict:
    import torch
    from transformers import AutoModel, AutoProcessor

    if mode == "package":
        import llm2clip4cxr  # noqa: F401  (registers the Auto classes)
    # Explicit either way: transformers never prompts, and "package" runs no file of the folder.
    remote = {"trust_remote_code": mode == "hub"}
    if kind.endswith("-adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base, **remote), path).merge_and_unload()
    else:
        model = AutoModel.from_pretrained(path, **remote)
    model.eval()
    out = {"class": type(model).__name__, "module": type(model).__module__}
    with torch.no_grad():
        if kind.startswith("text"):
            out["output"] = model.encode([sample])[0].tolist()
            return out
        try:
            processor = AutoProcessor.from_pretrained(base if kind.endswith("-adapter") else path, **remote)
        except OSError:  # no processor saved: compare the weights instead
            processor = None
        if processor is not None:
            out["output"] = model.get_text_features(**processor(text=[sample])).pooler_output[0].tolist()
        else:
            out["output"] = [float(sum(p.double().sum() for p in model.state_dict().values()))]
    return out


def load_sentence_transformer(path: str, sample: str) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    return {"class": type(model[0]).__name__, "output": model.encode([sample], convert_to_numpy=True)[0].tolist()}


def main(argv: list[str]) -> None:
    mode, kind, path, base, sample, out_file = argv
    if mode == "hub":
        sys.meta_path.insert(0, RefuseThisPackage())
    import transformers

    transformers.logging.set_verbosity_error()
    checks = {"package" if mode == "package" else "remote_code": lambda: load_model(mode, kind, path, base, sample)}
    if mode == "hub" and kind == "text":
        checks["sentence_transformers"] = lambda: load_sentence_transformer(path, sample)
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as error:
            message = str(error).strip().splitlines()
            results[name] = {"error": f"{type(error).__name__}: {message[0] if message else ''}"}
    with open(out_file, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
