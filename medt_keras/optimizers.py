"""The official MedT optimiser: PyTorch's Adam with coupled L2 weight decay.

The official train.py uses ``torch.optim.Adam(params, lr=1e-3,
weight_decay=1e-5)``. PyTorch's ``weight_decay`` there is an L2 penalty
added to the gradient before the moments (``g + wd * theta``), not the
decoupled decay of AdamW, which is what Keras' ``weight_decay=`` does. The
official gates start frozen (``requires_grad=False``): PyTorch's Adam
skips a parameter without a gradient entirely (no moment update, no decay,
no step counted), and counts its bias-correction steps per parameter, so a
gate unfrozen after epoch 10 starts its Adam steps at 1. ``OfficialAdam``
reproduces all of it.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medt_keras")
class OfficialAdam(keras.optimizers.Optimizer):
    """``torch.optim.Adam`` (amsgrad off): coupled L2, per-variable steps, frozen variables.

    For each variable, with ``g = gradient + l2 * theta`` and its own step
    count ``t``::

        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g**2
        theta -= lr / (1 - beta_1**t) * m / (sqrt(v) / sqrt(1 - beta_2**t) + epsilon)

    ``freeze(variables)`` holds variables still (no update, no moments, no
    step) until ``unfreeze(variables)``; both work before and after the
    optimiser is built.

    Args:
        learning_rate, beta_1, beta_2, epsilon: as ``torch.optim.Adam``
            (``lr``, ``betas``, ``eps``).
        l2: PyTorch's ``weight_decay`` (1e-5 in the official recipe).
    """

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        l2=0.0,
        name="official_adam",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.l2 = float(l2)
        self._frozen_paths = set()

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        self._steps = []
        self._active = []
        for variable in var_list:
            name = variable.path.replace("/", "_")
            self._steps.append(self.add_variable((), "zeros", variable.dtype, name=f"{name}_step"))
            active = 0.0 if variable.path in self._frozen_paths else 1.0
            self._active.append(
                self.add_variable((), keras.initializers.Constant(active), variable.dtype, name=f"{name}_active")
            )

    def _set_active(self, variables, active):
        for variable in variables:
            if active:
                self._frozen_paths.discard(variable.path)
            else:
                self._frozen_paths.add(variable.path)
            if self.built:
                self._active[self._get_variable_index(variable)].assign(1.0 if active else 0.0)

    def freeze(self, variables):
        """Holds ``variables`` still, as PyTorch's Adam does for ``requires_grad=False``."""
        self._set_active(variables, False)

    def unfreeze(self, variables):
        self._set_active(variables, True)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        active = ops.cast(self._active[index], dtype)
        m, v, step = self._momentums[index], self._velocities[index], self._steps[index]
        old_m, old_v = ops.convert_to_tensor(m), ops.convert_to_tensor(v)
        g = ops.cast(gradient, dtype) + self.l2 * variable
        t = step + active
        new_m = self.beta_1 * old_m + (1.0 - self.beta_1) * g
        new_v = self.beta_2 * old_v + (1.0 - self.beta_2) * ops.square(g)
        # A frozen variable that never ran has t = 0: keep the corrections finite.
        t_safe = ops.maximum(t, 1.0)
        bias_1 = 1.0 - ops.power(ops.cast(self.beta_1, dtype), t_safe)
        bias_2 = 1.0 - ops.power(ops.cast(self.beta_2, dtype), t_safe)
        denominator = ops.sqrt(new_v) / ops.sqrt(bias_2) + self.epsilon
        update = ops.cast(learning_rate, dtype) / bias_1 * new_m / denominator
        self.assign(m, ops.where(active > 0, new_m, old_m))
        self.assign(v, ops.where(active > 0, new_v, old_v))
        self.assign(step, t)
        self.assign_sub(variable, active * update)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon, "l2": self.l2}
        )
        return config
