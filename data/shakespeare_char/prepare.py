"""
Shakespeare at the character level: train.bin, val.bin (uint16 ids) and meta.json (the vocabulary, and the
end-of-text separator data/prepare.py adds), first 90% train, the rest val.
    python data/shakespeare_char/prepare.py [--input FILE] [--offline]
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# data/shakespeare_text.py, which both Shakespeare scripts share, by its path: no import path to set
spec = importlib.util.spec_from_file_location('shakespeare_text',
                                              os.path.join(HERE, '..', 'shakespeare_text.py'))
shakespeare_text = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shakespeare_text)
shakespeare_text.main(__doc__, HERE, 'char')
