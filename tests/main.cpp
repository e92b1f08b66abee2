// Catch2 entry point: one intra-op thread per rank, since tests run several ranks on 2 cores.
#define CATCH_CONFIG_RUNNER
#include <ATen/Parallel.h>
#include <catch2/catch.hpp>

int main(int argc, char* argv[]) {
  at::set_num_threads(1);
  return Catch::Session().run(argc, argv);
}
