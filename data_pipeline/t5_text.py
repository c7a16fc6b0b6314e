"""MAGI-1's caption path: the IF / PixArt caption cleaner, then T5 v1.1's encoder from a local folder.

MAGI-1 (``inference/model/t5``, commit 6ff822e; conventions in
``shared/data/magi1_vae_reference/README.md``) embeds a caption as follows, and so does this module:

1. :func:`clean_caption` applied **twice** (lower-cases first, so ftfy does not repair mojibake);
2. the *fast* tokenizer of the folder (``AutoTokenizer``), ``padding="max_length"`` to the caption length
   (800 in MAGI-1), ``truncation=True``, T5's ``</s>`` appended: the mask is 1 for the real tokens and ``</s>``;
3. ``T5EncoderModel`` loaded in **fp32** (asked for explicitly: transformers >= 5 keeps a folder's stored
   dtype otherwise), run with that mask; ``last_hidden_state`` in fp32.

An empty caption (or one that cleans to nothing) is embedded like any text: one valid row (``</s>``).
MAGI-1's *null* caption of guidance is not a T5 output but the DiT's learned
``y_embedder.null_caption_embedding`` (with its first 50 rows valid); it is not produced here.
Nothing downloads: the folder must hold the model and tokenizer files (``local_files_only``).
"""

from __future__ import annotations

import html
import os
import re
import urllib.parse

import torch

MAGI1_CAPTION_LENGTH = 800  # MAGI-1 model_config.caption_max_length
MAGI1_SUBFOLDER = "t5-v1_1-xxl"  # MAGI-1 loads <t5_pretrained>/t5-v1_1-xxl

_URL_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_MEDIA_EXTS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_BAD_PUNCT = "[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]+"
_DASHES = ("[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
           "\ufe31\ufe32\ufe58\ufe63\uff0d]+")

# The cleaner's regular-expression steps, in MAGI-1's order, split around the three non-regex steps
# (HTML -> text, the "-"/"_" rule, ftfy + double unescape). Each is (pattern, replacement).
_BEFORE_HTML = [
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
]
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),  # @handles
    (r"[\u31c0-\u31ef]+", ""), (r"[\u31f0-\u31ff]+", ""), (r"[\u3200-\u32ff]+", ""),  # CJK blocks
    (r"[\u3300-\u33ff]+", ""), (r"[\u3400-\u4dbf]+", ""), (r"[\u4dc0-\u4dff]+", ""), (r"[\u4e00-\u9fff]+", ""),
    (_DASHES, "-"),
    (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"),
    (r"&quot;?", ""), (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids (the text is already stripped, so this rarely fires)
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _MEDIA_EXTS, ""),  # file names
    (r"[\"\']{2,}", '"'), (r"[\.]{2,}", " "),
    (_BAD_PUNCT, " "),
    (r"\s+\.\s+", " "),
]
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),  # codes
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _MEDIA_EXTS + r"(\simage[s]?)?", ""),  # also eats word beginnings: "epsilon" -> "ilon"
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # dimensions, 1920x1080
    (r"\b\s+\:\s+", ": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", ""), (r"[\'\_,\-\:\-\+]$", ""), (r"^\.\S+$", ""),
]


def _apply(rules, text: str) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def clean_caption_once(caption: str) -> str:
    """One pass of the IF / PixArt-alpha caption cleaner that MAGI-1 uses (``use_text_preprocessing``)."""
    import ftfy
    from bs4 import BeautifulSoup

    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_AFTER_HTML, text)
    if len(re.findall(r"(?:\-|\_)", text)) > 3:  # this-is-my-cute-cat -> words
        text = re.sub(r"(?:\-|\_)", " ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _apply(_AFTER_FTFY, text).strip()


def clean_caption(caption: str) -> str:
    """MAGI-1's caption preprocessing: the cleaner applied twice in a row."""
    return clean_caption_once(clean_caption_once(caption))


def resolve_folder(folder: str) -> str:
    """The T5 folder: ``folder`` itself or MAGI-1's layout ``folder/t5-v1_1-xxl``; a one-line error otherwise."""
    if not folder:
        raise ValueError("text encoder t5 needs a local T5 folder (--text-weights / data.text_encoder_weights)")
    for cand in (os.path.join(folder, MAGI1_SUBFOLDER), folder):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise ValueError(f"T5 weights folder not found: {folder} (no config.json there or in {MAGI1_SUBFOLDER}/)")


class T5TextEncoder:
    """:class:`~magitrain.data_pipeline.text.TextEncoder` with MAGI-1's T5 conventions (module doc).

    ``embed(caption)`` -> ``(emb [max_len, dim] fp32, mask [max_len] bool)``; rows past the mask are zeroed
    (MAGI-1 leaves T5's outputs there; every consumer excludes them by the mask).
    """

    def __init__(self, folder: str, dim: int | None = None, max_len: int = MAGI1_CAPTION_LENGTH,
                 device: str | None = None, preprocess: bool = True):
        path = resolve_folder(folder)
        from transformers import AutoTokenizer, T5EncoderModel

        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"T5 folder {path} cannot be loaded: {str(e).splitlines()[0]}") from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device, self.preprocess, self.max_len = device, preprocess, max_len
        self.dim = self.model.config.d_model
        if dim is not None and dim != self.dim:
            raise ValueError(f"T5 in {path} is {self.dim} wide but the model's caption_channels is {dim}")

    def tokenize(self, caption: str) -> dict:
        text = clean_caption(caption) if self.preprocess else caption.lower().strip()
        return self.tokenizer([text], max_length=self.max_len, padding="max_length", truncation=True,
                              return_attention_mask=True, add_special_tokens=True, return_tensors="pt")

    @torch.no_grad()
    def embed(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenize(caption)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()[0].cpu()
        mask = mask[0].bool().cpu()
        return emb * mask[:, None], mask
