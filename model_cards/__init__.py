"""Model card templates of mode-hf (shipped inside the package as `mode_hf.model_cards`)."""
