// Links the installed libdiloco and runs one single-island outer step.
#include <ATen/ATen.h>
#include <diloco/diloco.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <cstdio>

int main() {
  auto group = std::make_shared<diloco::Group>(c10::make_intrusive<c10d::HashStore>(), 0, 1);
  std::vector<diloco::NamedParameter> params{{"w", at::ones({4}).set_requires_grad(true)}};
  diloco::DiLoCoOptions options;
  options.inner_steps = 1;
  diloco::DiLoCo sync(diloco::ModelTensors{params, {}, {}}, group, options);
  params[0].tensor.data().sub_(1.0);  // an "inner step"
  sync.step();
  std::printf("consumer: diloco %s, outer steps %lld\n", DILOCO_VERSION,
              static_cast<long long>(sync.stats().outer_steps));
  return sync.stats().outer_steps == 1 ? 0 : 1;
}
