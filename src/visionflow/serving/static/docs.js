"use strict";
// Swagger UI from this server's own copy (swagger-ui-bundle), so /docs works offline. The token the page was
// opened with (?token=) goes on its requests as an Authorization header, /openapi.json's and "Try it out"'s.
const token = new URLSearchParams(location.search).get("token");
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,  // the default badge would load from the internet
  requestInterceptor: req => {
    if (token) req.headers.Authorization = "Bearer " + token;
    return req;
  },
});
