"""Generation from slots: slot library, compositional generation, slot mixing, editing."""
