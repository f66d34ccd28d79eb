/* A small ONNX runner: reads a model file (protobuf, parsed by hand, no
 * dependency) and runs graphs made of Conv (any number of spatial dims, with
 * pads, strides, dilations, group and bias), Relu, Sigmoid, Add, Sub, Mul
 * (numpy broadcasting), Identity and Constant, in f32.
 *
 * It knows nothing of infl8: plugin.c wraps it in the plugin ABI. A loaded
 * model is immutable, so one model may run on many threads at once. */
#ifndef ONNX_MINI_H
#define ONNX_MINI_H

#include <stddef.h>
#include <stdint.h>

#define OM_MAX_RANK 8
#define OM_DIM_UNKNOWN (-1)

/* Results of om_* calls. OM_OK is 0; the others say which kind of failure
 * the message in the caller's buffer describes. */
typedef enum {
    OM_OK = 0,
    OM_ERR_LOAD,   /* the file cannot be read or holds an unsupported model */
    OM_ERR_SHAPE,  /* the input does not fit the model */
    OM_ERR_RUN,    /* running failed (out of memory, inconsistent shapes) */
    OM_ERR_ARG     /* a bad argument (null pointer, rank out of range) */
} om_status;

/* Name and shape of a graph input or output; OM_DIM_UNKNOWN marks a
 * symbolic or absent dimension. */
typedef struct {
    char *name;
    int rank;
    int64_t dims[OM_MAX_RANK];
} om_value_info;

typedef struct om_model om_model;

/* Parses and validates the model at `path`. On failure writes a message
 * into `err` (NUL-terminated, at most `err_cap` bytes) and returns NULL. */
om_model *om_load(const char *path, char *err, size_t err_cap);

/* The same from bytes in memory; `label` names them in messages. */
om_model *om_load_bytes(const uint8_t *bytes, size_t n, const char *label, char *err,
                        size_t err_cap);

void om_free(om_model *m);

const om_value_info *om_input(const om_model *m);
const om_value_info *om_output(const om_model *m);
size_t om_node_count(const om_model *m);

/* Runs the graph on `input` of `shape[0..rank]`. On success stores a
 * malloc'ed output (free it with free()) in `*out`, its shape in
 * `out_shape` and rank in `*out_rank`. */
om_status om_run(const om_model *m, const float *input, const uint64_t *shape, int rank,
                 float **out, uint64_t out_shape[OM_MAX_RANK], int *out_rank, char *err,
                 size_t err_cap);

/* printf into an error buffer, cut at a UTF-8 character boundary so the
 * message stays valid UTF-8 however small the buffer. */
void om_errorf(char *err, size_t err_cap, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#endif
