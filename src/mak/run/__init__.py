"""Jobs over files: ``mak run`` configs (:mod:`.config`) and their cached stages (:mod:`.pipeline`),
the select job that writes a selection from feature stores (:mod:`.select_job`) and the HTML
report (:mod:`.report`)."""
