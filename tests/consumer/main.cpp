// The program both consumer projects build: proof that procpool's headers and target work from
// an installed package and from add_subdirectory. Exits nonzero if something is off.
#include <procpool/version.hpp>

#include <cstdio>

int main() {
  std::printf("procpool %d.%d.%d\n", PROCPOOL_VERSION_MAJOR, PROCPOOL_VERSION_MINOR,
              PROCPOOL_VERSION_PATCH);
  return procpool::version == PROCPOOL_VERSION_MAJOR * 10000 + PROCPOOL_VERSION_MINOR * 100 +
                                  PROCPOOL_VERSION_PATCH
             ? 0
             : 1;
}
