"""Training data made from reports: rule-based report variants (`variants`: abbreviations, positives, hard
negatives), the triplets and findings -> impression pairs built from them (`triplets`), and compositional
synthetic reports (`synthetic`). Evaluation's own, held-out generators are in `evaluation.heldout_variants`.
"""
