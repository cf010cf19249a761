"""Training engines. Nothing is imported here (TRL takes seconds to import); use

    from stapo.engines.trl import STAPOConfig, STAPOTrainer
"""
