"""
Shakespeare at the character level: train.bin, val.bin (uint16 ids) and meta.json (the vocabulary, and the
end-of-text separator data/prepare.py adds), first 90% train, the rest val.
    python data/shakespeare_char/prepare.py [--input FILE] [--offline]
"""
import os
import runpy

HERE = os.path.dirname(os.path.abspath(__file__))
# data/shakespeare_text.py, which both Shakespeare scripts share, run by its path: no import path to set
main = runpy.run_path(os.path.join(HERE, '..', 'shakespeare_text.py'))['main']
main(__doc__, HERE, 'char')
