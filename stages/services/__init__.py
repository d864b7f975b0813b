"""Services the stages share instead of importing each other: model loading, generation,
teacher-forced scoring, running annotator steps, and the training set-up evaluate reuses."""
