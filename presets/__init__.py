"""The preset catalog (JSON files), shipped in the wheel as keras_gemma.presets."""
