"""Published exports in Immich's layout, built in the tests from tiny random models.

Mirrors what Immich's exporter writes (see clipgrep/imports/layout.py for the
source): config.json, visual/{model.onnx,preprocess_cfg.json},
textual/{model.onnx,tokenizer.json,tokenizer_config.json}; graphs traced with
batch 1 and no dynamic axes, outputs L2-normalised, text ids int32.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from clipgrep.embed.tokenizer import END_OF_WORD, MERGE_COUNT, _read_head_lines, _symbol_order

CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"


def _onnx_export(module: Any, args: tuple[Any, ...], path: Path, input_names: list[str]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=input_names,
                          output_names=["embedding"])


def clip_tokenizer_json(path: Path) -> None:
    """open_clip's CLIP BPE as a Hugging Face tokenizer.json, the way transformers' CLIP converter builds it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from clipgrep.convert.tokenizer_export import open_clip_bpe_path

    merges = _read_head_lines(open_clip_bpe_path(), MERGE_COUNT + 1)[1:]
    symbols = _symbol_order()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [m.replace(" ", "", 1) for m in merges]
    tokens += [CLIP_SOT, CLIP_EOT]
    vocab = dict(zip(tokens, range(len(tokens))))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                               continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD, fuse_unk=False,
                               unk_token=CLIP_EOT))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((CLIP_EOT, vocab[CLIP_EOT]), (CLIP_SOT, vocab[CLIP_SOT]),
                                                      add_prefix_space=False, trim_offsets=False)
    tok.add_special_tokens([CLIP_SOT, CLIP_EOT])
    tok.save(str(path))


XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def xlmr_tokenizer_json(path: Path, words: list[str]) -> None:
    """A small sentencepiece (Unigram) tokenizer shaped like XLM-RoBERTa's: <s> $A </s>, <pad> = 1."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=XLMR_SPECIALS, unk_token="<unk>")
    tok.train_from_iterator(words * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    tok.save(str(path))


def write_visual(model: Any, preprocess_cfg: dict[str, Any], root: Path) -> None:
    import torch
    import torch.nn.functional as F

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.model.encode_image(image), dim=-1)

    size = preprocess_cfg["size"]
    size = [int(v) for v in size] if isinstance(size, (list, tuple)) else [size, size]
    _onnx_export(Visual().eval(), (torch.randn(1, 3, *size),), root / "visual" / "model.onnx", ["image"])
    (root / "visual" / "preprocess_cfg.json").write_text(json.dumps({**preprocess_cfg, "size": size}))


def write_openclip_export(model: Any, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any], root: Path) -> Path:
    """An open_clip model as Immich's exporter writes it (textual input "text" int32 [1, L])."""
    import torch
    import torch.nn.functional as F

    class Textual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, text: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.model.encode_text(text), dim=-1)

    (root / "textual").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(model_cfg))
    write_visual(model, preprocess_cfg, root)
    length = model_cfg["text_cfg"].get("context_length", 77)
    _onnx_export(Textual().eval(), (torch.ones(1, length, dtype=torch.int32),), root / "textual" / "model.onnx",
                 ["text"])
    clip_tokenizer_json(root / "textual" / "tokenizer.json")
    (root / "textual" / "tokenizer_config.json").write_text(json.dumps({"pad_token": CLIP_EOT}))
    return root


class TinyMClipText:
    """An M-CLIP-shaped text tower: transformer-ish embedding, masked mean pool, linear, normalise."""

    def __init__(self, vocab: int, dim: int, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        self.module = _MClip(vocab, dim).eval()

    def __call__(self, ids: Any, mask: Any) -> Any:
        import torch

        with torch.no_grad():
            return self.module(torch.as_tensor(ids, dtype=torch.int32), torch.as_tensor(mask, dtype=torch.int32))


def _MClip(vocab: int, dim: int) -> Any:
    import torch
    import torch.nn.functional as F

    class MClip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, 48)
            self.layer = torch.nn.TransformerEncoderLayer(48, 4, 96, batch_first=True, dropout=0.0)
            self.proj = torch.nn.Linear(48, dim)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.layer(self.embed(input_ids.long()))
            m = attention_mask.unsqueeze(2).to(x.dtype)
            pooled = (x * m).sum(dim=1) / m.sum(dim=1)
            return F.normalize(self.proj(pooled), dim=-1)

    return MClip()


def write_mclip_export(visual_model: Any, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
                       text: TinyMClipText, tokenizer_words: list[str], root: Path) -> Path:
    """An M-CLIP export as Immich writes it: textual inputs input_ids + attention_mask, int32 [1, 77]."""
    import torch

    (root / "textual").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(model_cfg))
    write_visual(visual_model, preprocess_cfg, root)
    ones = torch.ones(1, 77, dtype=torch.int32)
    _onnx_export(text.module, (ones, ones), root / "textual" / "model.onnx", ["input_ids", "attention_mask"])
    xlmr_tokenizer_json(root / "textual" / "tokenizer.json", tokenizer_words)
    (root / "textual" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return root
