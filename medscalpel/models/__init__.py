"""Models: the zoo, introspection and checkpoints."""

from medscalpel.models.checkpoint import (ModelCard, import_foreign, load_model, make_card,
                                          save_model)
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import ARCHS, create_model, list_models

__all__ = ["ARCHS", "MedClassifier", "ModelCard", "create_model", "import_foreign", "list_models",
           "load_model", "make_card", "save_model"]
