/* Robustness check of onnx_mini.c, meant to be built with
 * -fsanitize=address,undefined (the SDK tests do): loads MODEL.onnx and runs
 * it, then loads every truncation of the file and every byte of it flipped
 * three ways, running whatever still loads. Each of those must fail with a
 * message or succeed; a crash, an out-of-bounds access or undefined
 * behaviour stops the sanitizers. Also checks that error messages are cut
 * at UTF-8 character boundaries.
 *
 *   selftest MODEL.onnx */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnx_mini.h"

/* Runs large enough to matter for a mutated model are skipped: the point is
 * memory safety, not waiting for a 1000^3 convolution. */
#define MAX_RUN_ELEMENTS 200000u

static int try_run(const om_model *m, unsigned batch) {
    const om_value_info *in = om_input(m);
    uint64_t shape[OM_MAX_RANK];
    size_t n = 1;
    for (int i = 0; i < in->rank; i++) {
        shape[i] = in->dims[i] < 0 ? (i == 0 ? batch : 4) : (uint64_t)in->dims[i];
        if (shape[i] != 0 && n > MAX_RUN_ELEMENTS / shape[i]) {
            return -1;
        }
        n *= (size_t)shape[i];
    }
    float *x = malloc((n ? n : 1) * sizeof(float));
    if (x == NULL) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)((i * 2654435761u) % 1000u) / 1000.0f;
    }
    float *y = NULL;
    uint64_t out_shape[OM_MAX_RANK];
    int out_rank = 0;
    char err[256];
    om_status st = om_run(m, x, shape, in->rank, &y, out_shape, &out_rank, err, sizeof err);
    if (st == OM_OK) {
        free(y);
    } else if (err[0] == '\0') {
        fprintf(stderr, "om_run failed (%d) without a message\n", (int)st);
        exit(1);
    }
    free(x);
    return st == OM_OK;
}

static void load_and_run(const uint8_t *bytes, size_t n, unsigned *loaded) {
    char err[512];
    err[0] = '\0';
    om_model *m = om_load_bytes(bytes, n, "mutant", err, sizeof err);
    if (m == NULL) {
        if (err[0] == '\0') {
            fprintf(stderr, "a refused model left no message\n");
            exit(1);
        }
        return;
    }
    (*loaded)++;
    try_run(m, 1);
    om_free(m);
}

static void check_utf8_cut(void) {
    /* "é" is 2 bytes, "€" 3: no cap may end a message inside either. */
    for (size_t cap = 1; cap < 16; cap++) {
        char buf[32];
        memset(buf, 'X', sizeof buf);
        om_errorf(buf, cap, "a%s%s%s", "\xC3\xA9", "\xE2\x82\xAC", "z");
        size_t len = strlen(buf);
        if (len >= cap || buf[cap] != 'X') {
            fprintf(stderr, "cap %zu: message overran its buffer\n", cap);
            exit(1);
        }
        if (len > 0 && ((unsigned char)buf[len - 1] & 0xC0) == 0xC0) {
            fprintf(stderr, "cap %zu: message ends in a lead byte\n", cap);
            exit(1);
        }
        static const size_t whole[] = {0, 1, 3, 6, 7};
        int ok = 0;
        for (size_t i = 0; i < sizeof whole / sizeof whole[0]; i++) {
            ok |= len == whole[i];
        }
        if (!ok) {
            fprintf(stderr, "cap %zu: cut inside a character (length %zu)\n", cap, len);
            exit(1);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.onnx\n", argv[0]);
        return 2;
    }
    char err[512];
    om_model *m = om_load(argv[1], err, sizeof err);
    if (m == NULL) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (try_run(m, 2) != 1) {
        fprintf(stderr, "the intact model did not run\n");
        return 1;
    }
    om_free(m);

    FILE *f = fopen(argv[1], "rb");
    if (f == NULL || fseek(f, 0, SEEK_END) != 0) {
        return 1;
    }
    long size = ftell(f);
    rewind(f);
    if (size <= 0 || size > (1 << 24)) {
        fprintf(stderr, "%s: %ld bytes; use a small model\n", argv[1], size);
        return 1;
    }
    size_t n = (size_t)size;
    uint8_t *bytes = malloc(n), *copy = malloc(n);
    if (bytes == NULL || copy == NULL || fread(bytes, 1, n, f) != n) {
        return 1;
    }
    fclose(f);

    unsigned loaded = 0, tries = 0;
    for (size_t len = 0; len < n; len++) {
        /* A copy of exactly `len` bytes, so reading past it is caught. */
        uint8_t *prefix = malloc(len ? len : 1);
        memcpy(prefix, bytes, len);
        load_and_run(prefix, len, &loaded);
        free(prefix);
        tries++;
    }
    static const uint8_t masks[] = {0x01, 0x80, 0xFF};
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < sizeof masks; k++) {
            memcpy(copy, bytes, n);
            copy[i] ^= masks[k];
            load_and_run(copy, n, &loaded);
            tries++;
        }
    }
    check_utf8_cut();
    printf("selftest: %u damaged variants of %zu bytes, %u still loaded; no fault\n", tries, n,
           loaded);
    free(bytes);
    free(copy);
    return 0;
}
