"""Jobs over files: ``mak run`` configs (:mod:`.config`) and their cached stages (:mod:`.stage`,
laid out by :mod:`.plan`, carried out by :mod:`.stages`, run by :mod:`.pipeline`, gathered by
:mod:`.results`), the select job that writes a selection from feature stores (:mod:`.select_job`)
and the HTML report (:mod:`.report`)."""
