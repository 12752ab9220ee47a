from compressx.pipelines import original_class, patched_class


class Pipeline:
    def __call__(self, prompt):
        return f"plain {prompt}"


def test_a_patched_pipeline_keeps_its_original_class_and_name():
    pipe = Pipeline()
    assert original_class(pipe) is Pipeline
    pipe.__class__ = patched_class(Pipeline, lambda self, prompt: f"patched {prompt}")
    assert pipe("x") == "patched x" and isinstance(pipe, Pipeline)
    assert type(pipe).__name__ == "Pipeline" and type(pipe).__module__ == Pipeline.__module__
    assert original_class(pipe) is Pipeline
    # patching again starts from the original class, not from the patched one
    pipe.__class__ = patched_class(original_class(pipe), lambda self, prompt: f"again {prompt}")
    assert pipe("x") == "again x" and type(pipe).__mro__[1] is Pipeline
