"""MAGI-1's T5 caption path (``magitrain.data_pipeline.t5_text``, ``--text-encoder t5``).

A tiny randomly initialised T5 v1.1-style encoder and a Unigram tokenizer trained here on a few sentences are
saved into tmp_path (no downloads). Embeddings must equal a direct ``transformers`` call on the same
preprocessed text with MAGI-1's tokenizer settings; the caption cleaner is checked against the behaviour
documented in ``shared/data/magi1_vae_reference/README.md`` (MAGI-1's own cleaner, run).
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("ftfy")
pytest.importorskip("bs4")

from magitrain.data_pipeline.t5_text import T5TextEncoder, clean_caption, clean_caption_once

MAX_LEN = 12
SENTENCES = ["a red ball rolls on the grass", "the cat sits on a mat", "a blue car drives down the road at night",
             "two dogs play with a ball in the park", "wow a green bird flies over the sea", "person walking home",
             "hello world bold text"]


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    folder = str(tmp_path_factory.mktemp("t5") / "t5-v1_1-xxl")  # MAGI-1's layout: <t5_pretrained>/t5-v1_1-xxl
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(SENTENCES, trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>",
                                                               special_tokens=["<pad>", "</s>", "<unk>"]))
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    fast.save_pretrained(folder)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(t5_folder):
    return T5TextEncoder(os.path.dirname(t5_folder), dim=16, max_len=MAX_LEN)  # found via the t5-v1_1-xxl subfolder


def _direct(folder: str, text: str):
    """What MAGI-1's T5Embedder does, called on transformers directly."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(folder)
    model = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).eval()
    t = tok([text], max_length=MAX_LEN, padding="max_length", truncation=True, return_attention_mask=True,
            add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        emb = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    return emb[0], t["attention_mask"][0].bool(), t["input_ids"][0]


@pytest.mark.parametrize("caption", ["A red ball rolls on the grass", "<b>Hello</b> world",
                                     "", "two dogs play with a ball in the park at night on the grass again"])
def test_embeddings_equal_direct_transformers_call(encoder, t5_folder, caption):
    emb, mask = encoder.embed(caption)
    ref, ref_mask, ids = _direct(t5_folder, clean_caption(caption))
    assert emb.dtype == torch.float32 and emb.shape == (MAX_LEN, 16)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(emb[mask], ref[ref_mask])
    assert not emb[~mask].any()  # padding rows zeroed (MAGI-1 leaves T5's values; the mask excludes them)
    n = int(mask.sum())
    assert ids[n - 1] == 1 and (ids[n:] == 0).all()  # ends in </s> (id 1), padded with id 0
    if caption == "":
        assert n == 1  # an empty caption is a real caption: the </s> row only
    if len(caption) > 40:
        assert n == MAX_LEN  # truncated to max_len pieces, still ending in </s>


def test_fp32_even_from_a_bf16_folder(t5_folder, tmp_path):
    from transformers import T5EncoderModel

    bf16 = str(tmp_path / "bf16")
    T5EncoderModel.from_pretrained(t5_folder).to(torch.bfloat16).save_pretrained(bf16)
    for name in os.listdir(t5_folder):
        if name.startswith("tokenizer"):
            with open(os.path.join(t5_folder, name), "rb") as src, open(os.path.join(bf16, name), "wb") as dst:
                dst.write(src.read())
    enc = T5TextEncoder(bf16, max_len=MAX_LEN)
    assert enc.model.dtype == torch.float32 and enc.embed("a cat")[0].dtype == torch.float32


@pytest.mark.parametrize("raw, cleaned", [
    ("<p>Hello &amp; <b>World</b></p>", "hello world"),  # HTML -> text, lower-cased, '&' a bad punctuation
    ("&lt;b&gt;bold&lt;/b&gt; text", "bold< b> text"),  # pass 1 unescapes a tag that pass 2 removes
    ("Watch https://example.com/video now", "watch now"),  # URLs dropped
    ("Watch https://example.com/video?x=1 now", "watch ?x=1 now"),  # ... but their query strings can survive
    ("see www.example.org/page today", "see today"),
    ("@bob says hi", "says hi"),  # handles dropped
    ("CafÃ© time", "cafã time"),  # lower-cased before ftfy: mojibake not repaired
    ("日本語 カナ 한국어 ok", "カナ 한국어 ok"),  # CJK U+31C0..U+9FFF dropped, kana and hangul kept
    ("“Smart” quotes — dash", '"smart" quotes - dash'),  # quotes and dashes unified
    ("wow... nice", "wow nice"),  # 2+ dots -> one space
    ("at 2:30", "at 2:30"),  # the trailing d:dd rule does not fire
    ("epsilon pdfs", "ilon s"),  # the extension rule eats word beginnings
    ("#12 #1234 #cats", "1234 cats"),  # '#123' tags dropped, '#1234' and hashtags keep their text
    ("<person> smiles", "person smiles"),
    ("size 1920x1080 jc6640 free shipping", "size"),
    ("this-is-my-cute-cat", "this is my cute cat"),  # more than 3 '-'/'_' -> spaces
    ("", ""), (".hidden", ""),
])
def test_clean_caption_documented_cases(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_cleaner_runs_twice():
    raw = "&lt;b&gt;bold&lt;/b&gt; text"
    assert clean_caption_once(raw) == "<b>bold< b> text" != clean_caption(raw)


def test_missing_folder_is_one_line_error(tmp_path):
    from magitrain.data_pipeline.build_shards import main as build_shards

    missing = str(tmp_path / "no_t5")
    with pytest.raises(ValueError, match=f"T5 weights folder not found: {missing}"):
        T5TextEncoder(missing)
    (tmp_path / "src").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src" / "x.png")
    assert build_shards([str(tmp_path / "src"), str(tmp_path / "out"), "--text-encoder", "t5",
                         "--text-weights", missing]) == 2


def test_build_shards_stores_t5_rows(t5_folder, tmp_path, encoder):
    """``build_shards --text-encoder t5`` stores the valid rows of MAGI-1's embedding (fp16)."""
    from magitrain.data_pipeline.build_shards import main as build_shards
    from PIL import Image

    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src" / "x.png")
    (tmp_path / "src" / "x.txt").write_text("The <i>cat</i> sits on a mat")
    out = tmp_path / "out"
    assert build_shards([str(tmp_path / "src"), str(out), "--text-encoder", "t5", "--text-weights", t5_folder,
                         "--text-len", str(MAX_LEN), "--quiet"]) == 0
    with tarfile.open(out / "shard-000000.tar") as tf:
        stored = np.load(io.BytesIO(tf.extractfile("x.text_emb.npy").read()), allow_pickle=False)
    emb, mask = encoder.embed("The <i>cat</i> sits on a mat")
    assert stored.dtype == np.float16 and np.array_equal(stored, emb[mask].numpy().astype(np.float16))
