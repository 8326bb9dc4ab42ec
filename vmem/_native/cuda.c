/* cuda.c — placeholder until the CUDA backend lands: reports VMEM_ERR_UNSUPPORTED. */
#include "internal.h"

static int cuda_open(vmem_backend_t *b, int device, vmem_err_t *err)
{
    (void)b;
    (void)device;
    _vmem_err_set(err, VMEM_ERR_UNSUPPORTED, VMEM_DETAIL_NONE, 0, -1);
    return VMEM_ERR_UNSUPPORTED;
}

const vmem_ops_t vmem_cuda_ops = {
    VMEM_KIND_CUDA, 0, cuda_open, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};
