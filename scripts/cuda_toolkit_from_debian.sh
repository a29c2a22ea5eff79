#!/usr/bin/env bash
# Assemble a CUDA 12 toolkit folder from Debian's non-free packages, for building the cu12 wheel on a machine without
# NVIDIA's installer (PyPI's nvidia-cuda-nvcc-cu12 ships ptxas only: no nvcc driver, no cicc).
#
#   scripts/cuda_toolkit_from_debian.sh [DEST]     default DEST: .toolkits/cuda-MAJOR.MINOR (git-ignored)
#   DEBIAN_SUITE=trixie DEBIAN_MIRROR=URL   the archive to take the packages from (default: the Debian archive this
#                                            machine's apt already uses)
#
# Debian trixie carries CUDA 12.4 (nvidia-cuda-toolkit 12.4.131, nvidia-cuda-dev 12.4.127). Nothing is installed into
# the system: apt runs on a private sources list, package index and cache in a temporary folder, downloads the .debs
# and `dpkg-deb` unpacks them there; only the parts a CUDA compile and CMake's enable_language(CUDA) +
# find_package(CUDAToolkit) need are copied into NVIDIA's standard layout:
#
#   DEST/bin/{nvcc,cicc's callers: cudafe++,ptxas,fatbinary,nvlink,bin2c,...}, DEST/bin/crt/, DEST/bin/nvcc.profile
#   DEST/nvvm/bin/cicc, DEST/nvvm/libdevice/libdevice.10.bc
#   DEST/include (runtime headers + CCCL), DEST/lib (libcudart_static.a, libcudadevrt.a, libculibos.a, libcudart.so,
#   stubs/libcuda.so), DEST/lib64 -> lib, DEST/targets/x86_64-linux/{include,lib} -> ../../{include,lib}
#
# bin/nvcc is NVIDIA's driver binary (Debian's /usr/bin/nvcc is a shell wrapper with /usr paths baked in), and the
# nvcc.profile is NVIDIA's relocatable one ($(_HERE_)-relative) instead of Debian's, which points at /usr/lib/....
# The NVIDIA binaries need glibc >= 2.7 only, so they run on Debian 12 (glibc 2.36); CUDA 12.4 takes gcc <= 13.
# nvidia-cuda-dev is ~900 MB (every static CUDA library); only its headers and the runtime archives are unpacked.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${DEBIAN_SUITE:-trixie}
# The Debian archive this machine's apt is configured with (deb822 .sources or a one-line sources.list).
system_mirror() {
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" {print $2}'
      cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed 's/\[[^]]*\]//' \
          | awk '$1 == "deb" {print $2}'
    } | grep -m 1 '/debian/\?$' || true
}
MIRROR=${DEBIAN_MIRROR:-$(system_mirror)}
[ -n "$MIRROR" ] || { echo "no Debian archive in this machine's apt sources: set DEBIAN_MIRROR" >&2; exit 1; }
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PACKAGES=(nvidia-cuda-toolkit nvidia-cuda-dev libcudart12 libcu++-dev libcub-dev libthrust-dev)

[ -r "$KEYRING" ] || { echo "missing $KEYRING (apt-get install debian-archive-keyring)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs" "$WORK/unpacked"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main contrib non-free" > "$WORK/sources.list"
# A private apt: its own sources, index, cache and an empty dpkg status, so the system's apt state is never touched.
apt_private=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache" -o Dir::State::Status=/dev/null
             -o APT::Architecture=amd64 -o APT::Sandbox::User=root)

echo "=== Debian $SUITE package index"
apt-get "${apt_private[@]}" -q update > "$WORK/update.log" || { cat "$WORK/update.log" >&2; exit 1; }
echo "=== downloading ${PACKAGES[*]}"
(cd "$WORK/debs" && apt-get "${apt_private[@]}" -q download "${PACKAGES[@]}")

deb() { ls "$WORK"/debs/"$1"_*.deb; }
unpack() {  # unpack(package, tar member patterns...): only these members of the package's data archive
    local package=$1
    shift
    echo "=== unpacking $(basename "$(deb "$package")")"
    dpkg-deb --fsys-tarfile "$(deb "$package")" | tar -x -C "$WORK/unpacked" --wildcards "$@"
}
unpack nvidia-cuda-toolkit './usr/bin/*' './usr/lib/nvidia-cuda-toolkit/*'
unpack nvidia-cuda-dev './usr/include/*' './usr/lib/x86_64-linux-gnu/libcudart_static.a' \
    './usr/lib/x86_64-linux-gnu/libcudadevrt.a' './usr/lib/x86_64-linux-gnu/libculibos.a' \
    './usr/lib/x86_64-linux-gnu/stubs/libcuda.so'
unpack libcudart12 './usr/lib/x86_64-linux-gnu/libcudart.so.*'
for package in libcu++-dev libcub-dev libthrust-dev; do
    unpack "$package" './usr/include/*'
done

toolkit_version=$(dpkg-deb -f "$(deb nvidia-cuda-toolkit)" Version)  # e.g. 12.4.131~12.4.1-2
major_minor=$(echo "$toolkit_version" | sed -n 's/^\([0-9]*\)\.\([0-9]*\)\..*/\1.\2/p')
DEST=${1:-$ROOT/.toolkits/cuda-$major_minor}
echo "=== assembling CUDA $toolkit_version in $DEST"
rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/nvvm/bin" "$DEST/nvvm/libdevice" "$DEST/include" "$DEST/lib/stubs" \
    "$DEST/targets/x86_64-linux"
src=$WORK/unpacked/usr
debian_bin=$src/lib/nvidia-cuda-toolkit/bin
cp -a "$debian_bin/nvcc" "$debian_bin/crt" "$DEST/bin/"
cp -a "$debian_bin/cicc" "$DEST/nvvm/bin/"
cp -a "$src/lib/nvidia-cuda-toolkit/libdevice/." "$DEST/nvvm/libdevice/"
for tool in bin2c cu++filt cudafe++ cuobjdump fatbinary nvdisasm nvlink nvprune ptxas __nvcc_device_query; do
    cp -a "$src/bin/$tool" "$DEST/bin/"
done
cp -a "$src/include/." "$DEST/include/"
cp -a "$src"/lib/x86_64-linux-gnu/{libcudart_static.a,libcudadevrt.a,libculibos.a,libcudart.so.*} "$DEST/lib/"
cp -a "$src/lib/x86_64-linux-gnu/stubs/libcuda.so" "$DEST/lib/stubs/"
ln -s "$(cd "$DEST/lib" && ls libcudart.so.* | sort | head -n 1)" "$DEST/lib/libcudart.so"
ln -s lib "$DEST/lib64"
ln -s ../../include "$DEST/targets/x86_64-linux/include"
ln -s ../../lib "$DEST/targets/x86_64-linux/lib"
# NVIDIA's relocatable profile: every path relative to nvcc itself ($(_HERE_)), so the folder can move.
cat > "$DEST/bin/nvcc.profile" <<'EOF'

TOP              = $(_HERE_)/..

NVVMIR_LIBRARY_DIR = $(TOP)/$(_NVVM_BRANCH_)/libdevice

LD_LIBRARY_PATH += $(TOP)/lib:
PATH            += $(TOP)/$(_NVVM_BRANCH_)/bin:$(_HERE_):

INCLUDES        +=  "-I$(TOP)/$(_TARGET_DIR_)/include" $(_SPACE_)

LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/$(_TARGET_DIR_)/lib$(_TARGET_SIZE_)/stubs" "-L$(TOP)/$(_TARGET_DIR_)/lib$(_TARGET_SIZE_)"

CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF
{
    echo "Assembled by scripts/cuda_toolkit_from_debian.sh from Debian $SUITE ($MIRROR):"
    for package in "${PACKAGES[@]}"; do
        echo "  $package $(dpkg-deb -f "$(deb "$package")" Version)"
    done
} > "$DEST/DEBIAN_SOURCES.txt"

# The toolkit must compile and link a kernel on its own (host compiler: g++ on PATH) before anyone builds with it.
echo "=== checking $DEST/bin/nvcc"
"$DEST/bin/nvcc" --version | tail -n 2
cat > "$WORK/check.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cuda_runtime.h>
__global__ void scale(__half* x, float factor) {
    x[threadIdx.x] = __float2half(__half2float(x[threadIdx.x]) * factor);
}
int main() { return cudaGetLastError() == cudaSuccess ? 0 : 1; }
EOF
"$DEST/bin/nvcc" -arch=sm_80 -cudart static -o "$WORK/check" "$WORK/check.cu"
du -sh "$DEST"
echo "CUDA $major_minor toolkit ready: $DEST (build with: scripts/build_wheels.sh $DEST)"
