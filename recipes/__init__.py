"""Recipe files (TOML) and the one loader that validates them."""
from recipes.loader import (
                            CalibrationConfig,
                            QuantizeConfig,
                            Recipe,
                            RecipeError,
                            TuningConfig,
                            list_recipes,
                            load_recipe,
)

__all__ = ["Recipe", "QuantizeConfig", "CalibrationConfig", "TuningConfig", "RecipeError", "load_recipe",
           "list_recipes"]
