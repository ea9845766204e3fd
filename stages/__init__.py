"""The Ray stages, one file each, and the command line on top of them (cli.py).

stage1_tokenize -> stage2_score_ref -> stage3_train   (joined by cache entries, found through pipeline.data.entries)
"""
