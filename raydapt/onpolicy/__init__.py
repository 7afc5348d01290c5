"""On-policy distillation: the student samples through vLLM, the teacher pool scores what it
wrote, the trainer learns from it, and the trainer's weights flow back to the rollout engines.

    rows.py    pure: samples + teacher scores -> training rows, length statistics
    source.py  Ray: rollout and teacher engine actors, and the per-step batch source
"""
