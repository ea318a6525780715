"""`llm2clip4cxr convert`: turn the authors' published weights into checkpoints of this package."""

from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert the published LLM2Vec4CXR / LLM2CLIP4CXR weights into checkpoints of this package",
        description="Convert the authors' published weights (see docs/compatibility.md).",
    )
    kinds = parser.add_subparsers(dest="convert_kind", required=True)

    text = kinds.add_parser(
        "llm2vec4cxr",
        help="the published LLM2Vec4CXR Hub folder -> an LLM2Vec4CXR checkpoint",
        description="Convert the published LLM2Vec4CXR folder (plain decoder config.json, tokenizer, "
        "model.safetensors with latent_attn.*) into an LLM2Vec4CXR checkpoint with latent-attention pooling.",
        parents=[common.JSON],
    )
    text.add_argument("source", help="the published folder (downloaded from the Hub)")
    text.add_argument("destination", help="output folder (must not exist)")
    text.add_argument(
        "--pooling-mode", choices=("mean", "eos", "weighted_mean", "latent_attention"),
        help="pooling the weights were trained with; required when the folder has no latent_attn.* weights",
    )
    text.add_argument(
        "--latent-attention-heads", type=int, default=8, help="heads of the latent attention (8 when published)"
    )
    text.add_argument("--max-seq-length", type=int, default=512, help="longest tokenized input (512 when published)")
    text.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    text.set_defaults(handler=run_llm2vec4cxr)

    clip = kinds.add_parser(
        "llm2clip4cxr",
        help="the published LLM2CLIP4CXR state dict -> an LLM2CLIP4CXR checkpoint (EVA02 vision tower)",
        description="Convert the published LLM2CLIP4CXR state dict (EVA02-CLIP-L/14 visual.*, text.projection.*, "
        "logit_scale, LoRA of the text tower) into an LLM2CLIP4CXR checkpoint. Loaded with "
        "torch.load(weights_only=True): pickles that need code are refused.",
        parents=[common.JSON],
    )
    clip.add_argument("state_dict", help="the published .bin/.pt state dict (or .safetensors)")
    clip.add_argument("destination", help="output folder (must not exist)")
    clip.add_argument("--text-model", required=True, help="the converted LLM2Vec4CXR folder (convert llm2vec4cxr)")
    clip.add_argument(
        "--adapter-name", default="llm2clip", help="LoRA adapter to merge into the text tower (llm2clip)"
    )
    clip.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha of training (32 when published)")
    clip.add_argument(
        "--vision-head-dim", type=int, default=64, help="vision head size when the state dict has no rotary tables"
    )
    clip.add_argument("--rope-pretrain-grid", type=int, default=16, help="patch grid of the rotary pretraining (16)")
    clip.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    clip.set_defaults(handler=run_llm2clip4cxr)


def run_llm2vec4cxr(args) -> int:
    from ..conversion import convert_llm2vec4cxr

    summary = convert_llm2vec4cxr(
        args.source, args.destination, pooling_mode=args.pooling_mode,
        latent_attention_heads=args.latent_attention_heads, max_seq_length=args.max_seq_length,
        overwrite=args.overwrite,
    )
    text = (
        f"Converted {args.source} -> {args.destination}: {summary['pooling_mode']} pooling, hidden size "
        f"{summary['hidden_size']}, {summary['backbone_keys']} backbone + {summary['latent_attention_keys']} "
        f"latent-attention tensors ({summary['dtype']})"
        + (f"; dropped unused {', '.join(summary['dropped_keys'])}" if summary["dropped_keys"] else "")
        + "."
    )
    return common.emit(args, summary, text)


def run_llm2clip4cxr(args) -> int:
    from ..conversion import convert_llm2clip4cxr

    summary = convert_llm2clip4cxr(
        args.state_dict, args.destination, text_model=args.text_model, adapter_name=args.adapter_name,
        lora_alpha=args.lora_alpha, vision_head_dim=args.vision_head_dim,
        rope_pretrain_grid=args.rope_pretrain_grid, overwrite=args.overwrite,
    )
    vision = summary["vision"]
    text = (
        f"Converted {args.state_dict} -> {args.destination}: EVA02 {vision['num_hidden_layers']} layers x "
        f"{vision['hidden_size']} at {vision['image_size']} px, projection {summary['projection_dim']}, LoRA adapter "
        f"{summary['merged_lora_adapter']!r} merged into {summary['merged_lora_modules']} modules."
    )
    return common.emit(args, summary, text)
