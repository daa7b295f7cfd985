"""The code of agl's pyfunc models (MLflow models from code): loading this builds the model, nothing is unpickled."""
import mlflow

from agl.tracking.pyfunc import AglPyfuncModel

mlflow.models.set_model(AglPyfuncModel())
