"""Two-stage model compression ("Leaner and Faster", Ren & Zhu, NAACL 2022) for ``clipgrep compress``.

Stage 1 distils each student tower from its own teacher tower (intra-modal
contrastive KD); stage 2 fine-tunes the image tower and then the text tower
with contrastive, similarity-KD and corpus-level hard-negative losses.

Nothing is imported here on purpose: modules that need torch import it
themselves, and only ``clipgrep compress`` reaches them, so ``import clipgrep``
and the search path stay torch-free (STYLE rule 1). ``mining`` and ``metrics``
need numpy only.
"""
