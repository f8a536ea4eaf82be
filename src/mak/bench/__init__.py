"""Measuring a selection: the open-world benchmark (:mod:`.openworld`, with out-of-domain glyphs from
:mod:`.glyphs`), linear-probe and kNN evaluation (:mod:`.evaluate`) and what a pick is made of
(:mod:`.analysis`)."""
