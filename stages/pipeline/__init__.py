"""The pipeline layer: what a stage is (context), the stages by name (registry), how one runs and is
reused (runner), where artifacts live (store, atomic), config references (refs, sections), errors and
paths. Knows nothing about models; stages import from here, never the other way round."""
