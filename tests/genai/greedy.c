/* Greedy generation through onnxruntime-genai's C API: greedy FOLDER MAX_NEW ID [ID ...]
 * prints the generated token ids on one line. The Python wheel ships libonnxruntime-genai.so but not its
 * header, so the few functions used are declared here as the documented C API (ort_genai_c.h) has them. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct OgaResult OgaResult;
typedef struct OgaModel OgaModel;
typedef struct OgaGeneratorParams OgaGeneratorParams;
typedef struct OgaGenerator OgaGenerator;

OgaResult* OgaCreateModel(const char* config_path, OgaModel** out);
OgaResult* OgaCreateGeneratorParams(const OgaModel* model, OgaGeneratorParams** out);
OgaResult* OgaGeneratorParamsSetSearchNumber(OgaGeneratorParams* params, const char* name, double value);
OgaResult* OgaGeneratorParamsSetSearchBool(OgaGeneratorParams* params, const char* name, bool value);
OgaResult* OgaCreateGenerator(const OgaModel* model, const OgaGeneratorParams* params, OgaGenerator** out);
OgaResult* OgaGenerator_AppendTokens(OgaGenerator* generator, const int32_t* ids, size_t count);
bool OgaGenerator_IsDone(OgaGenerator* generator);
OgaResult* OgaGenerator_GenerateNextToken(OgaGenerator* generator);
OgaResult* OgaGenerator_GetNextTokens(const OgaGenerator* generator, const int32_t** out, size_t* out_count);
const char* OgaResultGetError(const OgaResult* result);
void OgaDestroyResult(OgaResult* result);
void OgaDestroyGenerator(OgaGenerator* generator);
void OgaDestroyGeneratorParams(OgaGeneratorParams* params);
void OgaDestroyModel(OgaModel* model);
void OgaShutdown(void);

static void check(OgaResult* result, const char* what) {
  if (result) {
    fprintf(stderr, "%s: %s\n", what, OgaResultGetError(result));
    OgaDestroyResult(result);
    exit(1);
  }
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s FOLDER MAX_NEW ID [ID ...]\n", argv[0]);
    return 2;
  }
  int max_new = atoi(argv[2]);
  size_t n = (size_t)(argc - 3);
  int32_t* ids = malloc(n * sizeof(int32_t));
  for (size_t i = 0; i < n; i++) ids[i] = (int32_t)atoi(argv[3 + i]);

  OgaModel* model = NULL;
  OgaGeneratorParams* params = NULL;
  OgaGenerator* generator = NULL;
  check(OgaCreateModel(argv[1], &model), "OgaCreateModel");
  check(OgaCreateGeneratorParams(model, &params), "OgaCreateGeneratorParams");
  check(OgaGeneratorParamsSetSearchBool(params, "do_sample", false), "do_sample");
  check(OgaGeneratorParamsSetSearchNumber(params, "max_length", (double)(n + max_new)), "max_length");
  check(OgaCreateGenerator(model, params, &generator), "OgaCreateGenerator");
  check(OgaGenerator_AppendTokens(generator, ids, n), "OgaGenerator_AppendTokens");
  for (int step = 0; step < max_new && !OgaGenerator_IsDone(generator); step++) {
    const int32_t* next = NULL;
    size_t count = 0;
    check(OgaGenerator_GenerateNextToken(generator), "OgaGenerator_GenerateNextToken");
    check(OgaGenerator_GetNextTokens(generator, &next, &count), "OgaGenerator_GetNextTokens");
    printf(step ? " %d" : "%d", next[0]);
  }
  printf("\n");
  OgaDestroyGenerator(generator);
  OgaDestroyGeneratorParams(params);
  OgaDestroyModel(model);
  free(ids);
  OgaShutdown();
  return 0;
}
